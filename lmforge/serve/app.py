"""The HTTP API: OpenAI-style completions and chat completions over the engine, plus health, metrics and the page.

    app = create_app("runs/NAME", max_batch=16)        # uvicorn.run(app) serves it; `lmforge serve` does both

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (503 until the engine is warm),
GET /metrics (Prometheus text), GET / (the playground page). Requests are validated strictly (pydantic: unknown
fields and wrong types are 400s, with OpenAI's error body); each becomes engine Requests handed to the engine's
thread (loop.py), and its events come back as one JSON response or as Server-Sent Events ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import shutil
import socket
import struct
import json
import logging
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Callable, Literal

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runs import check_dtype, model_config_of, model_folder, read_run_config
from ..engine import MAX_LOGPROBS, Engine, Logprob, Request
from ..errors import UserError
from ..structured import Constraint
from ..templates import chat_ids, chat_prompt_ids, from_legacy, template_of
from ..tokenizer import prompt_ids
from .loop import Busy, EngineLoop, Job, Metrics, Slots

log = logging.getLogger("lmforge.serve")
requests_log = logging.getLogger("lmforge.serve.requests")  # one JSON line per request

MAX_N = 16  # choices one request may ask for
MAX_STOP = 16  # stop strings one request may give
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: impossible tokens report this


# --------------------------------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # unknown fields and wrong types are the client's error

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):  # clients send "temperature": null to mean "the default"; unknown fields stay
        return ({k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
                if isinstance(data, dict) else data)


class StreamOptions(_Body):
    include_usage: bool = False


class JSONSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict | bool | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # (the output always follows the schema)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # beyond OpenAI's API, as vLLM and llama.cpp's server take it
    repetition_penalty: float = Field(1.0, ge=0.01, le=10)  # likewise
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float = 0.0  # accepted at 0 only: see _refuse_unsupported
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # the client's own tag; not used
    # structured output: OpenAI's response_format, or one of vLLM's guided_* fields (at most one of them)
    response_format: ResponseFormat | None = None
    guided_json: dict | None = None  # a JSON schema
    guided_regex: str | None = None  # a regular expression the whole output matches
    guided_choice: list[str] | None = Field(None, min_length=1)  # the output is one of these strings
    guided_grammar: str | None = None  # a Lark or GBNF grammar


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None  # a completion prompt, or
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # a conversation, rendered as the chat route does
    add_special_tokens: bool = True  # a prompt: the family's begin-of-text first, where its tokenizer adds one
    add_generation_prompt: bool = True  # messages: end with the template's generation prompt, as the chat route


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = ("invalid_request_error" if status < 429 else "rate_limit_error" if status == 429
            else "service_unavailable" if status == 503 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# ------------------------------------------------------------------------------------------------------ the server

class Server:
    """What the routes share: the engine's thread, the limits, the served model's name and its chat template."""

    def __init__(self, run: str | Path, device: str = "cpu", dtype: str = "float32", checkpoint: str | None = None,
                 max_batch: int = 8, max_seq_len: int | None = None, max_tokens_limit: int | None = None,
                 max_queue: int = 64,
                 api_key: str | None = None, compile: str = "auto", model_name: str | None = None,
                 on_failure: Callable[[BaseException], None] = lambda e: None, request_timeout: float | None = None,
                 log_prompts: bool = False, slots: Slots | None = None, metrics: Metrics | None = None,
                 build_lock: threading.Lock | None = None, all_ready: Callable[[], bool] = lambda: True):
        config = read_run_config(Path(run))  # a missing or broken run fails now, before the server starts
        legacy = config.get("chat_template")  # the old dict form in config.json: converted to its Jinja template
        if legacy is not None and not isinstance(legacy, str):
            from_legacy(legacy)
            log.info("%s/config.json holds the old chat_template form; it is served as the Jinja template that "
                     "renders the same text (fine-tune or save the run again to store it with the tokenizer)", run)
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"--max-batch={max_batch} must be at least 1 and --max-queue={max_queue} at least 0")
        if max_tokens_limit is not None and max_tokens_limit < 1:
            raise UserError(f"--max-tokens-limit={max_tokens_limit} must be at least 1")
        if request_timeout is not None and not request_timeout > 0:
            raise UserError(f"--request-timeout={request_timeout} must be a positive number of seconds")
        self.request_timeout, self.log_prompts = request_timeout, log_prompts
        if compile not in ("auto", "on", "off"):
            raise UserError(f"--compile={compile!r} must be auto, on or off")
        check_dtype(dtype)
        block_size = model_config_of(model_folder(Path(run), checkpoint), config, run).block_size
        self.max_seq_len = max_seq_len or block_size
        self.max_tokens_limit = min(max_tokens_limit or self.max_seq_len, self.max_seq_len)
        if api_key is not None and (not api_key.strip() or not api_key.isascii() or api_key != api_key.strip()):
            raise UserError("the API key must be non-empty printable ASCII without surrounding spaces (HTTP headers "
                            "carry nothing else)")
        self.run_config, self.api_key = config, api_key
        self.name = model_name or Path(run).resolve().name
        self.created = int(time.time())
        self.metrics = metrics or Metrics()

        def build() -> Engine:
            with build_lock or threading.Lock():
                return built()

        def built() -> Engine:
            from ..runs import load
            model, tokenizer = load(run, device=device, checkpoint=checkpoint, dtype=dtype)
            engine = Engine(model, tokenizer, max_batch=max_batch, max_seq_len=self.max_seq_len,
                            compile=_should_compile(compile, model))
            warm = engine.add(Request([tokenizer.eot_id], max_new_tokens=2, temperature=0.0, stop_at_eos=False))
            while warm in engine:  # one request through prefill and decode: first-call costs are paid here
                engine.step()
            log.info("engine ready: %s, %d slots x %d positions, compiled=%s", self.name, max_batch,
                     self.max_seq_len, engine._step is not None)
            return engine

        def failed(e: BaseException):
            log.error("loading %s (model %r) failed: %s", run, self.name, e)
            on_failure(e)
        self.all_ready = all_ready
        self.loop = EngineLoop(build, capacity=max_batch, metrics=self.metrics.of(self.name), on_failure=failed,
                               slots=slots or Slots(max_batch, max_queue))

    @property
    def engine(self) -> Engine:
        if self.loop.error is not None:
            raise APIError(503, f"the model failed to load: {self.loop.error}", code="model_failed")
        if not self.loop.ready.is_set() or not self.all_ready():  # (no model steps while another compiles)
            raise APIError(503, "the model is still loading; retry when GET /health answers 200", code="loading")
        return self.loop.engine

    # --- turning bodies into engine requests
    def prompts(self, prompt) -> list[list[int]]:
        """A completion prompt (a string, a list of strings, token ids, or a list of token-id lists) as id lists."""
        tokenizer = self.engine.tokenizer
        if isinstance(prompt, str):
            prompt = [prompt]
        elif not prompt:
            raise APIError(400, "prompt is an empty list; give a string or a non-empty list", param="prompt")
        elif isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            if isinstance(p, str):
                _check_text(p, "prompt")
                try:
                    ids = prompt_ids(tokenizer, p)  # begin-of-text first where the family has one
                except UserError as e:
                    raise APIError(400, f"prompt: {e}", param="prompt") from None
                out.append(ids)  # an empty prompt starts after end-of-text
            elif not p:
                raise APIError(400, "a token-id prompt is empty", param="prompt")
            else:
                out.append(list(p))
        return out

    @property
    def chat_template(self) -> str:
        """The run's one template (templates.template_of): its tokenizer's, the old config.json form converted, or
        the pairs template for a run never tuned on conversations."""
        return template_of(self.engine.tokenizer, self.run_config)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        """The messages rendered by the run's chat template with its generation prompt, as ids: the same ids the
        training data of these messages starts with (templates.chat_prompt_ids)."""
        rows = []
        for m in messages:
            content = m.content if isinstance(m.content, str) else "".join(part.text for part in m.content)
            _check_text(content, "messages")
            rows.append({"role": m.role, "content": content})
        try:
            if not add_generation_prompt:
                return chat_ids(self.engine.tokenizer, rows, self.chat_template, False)
            return chat_prompt_ids(self.engine.tokenizer, rows, self.chat_template)
        except UserError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None

    def requests(self, prompts: list[list[int]], body: _Sampling, max_tokens: int | None,
                 logprobs: int | None, prompt_logprobs: bool = False) -> list[Request]:
        """Engine requests for every prompt x choice: choice j of a seeded request is seeded seed + j."""
        _refuse_unsupported(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop takes up to {MAX_STOP} non-empty strings", param="stop")
        for s in stop:
            _check_text(s, "stop")
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options needs stream=true", param="stream_options")
        if body.seed is not None and body.seed + body.n - 1 >= 2**63:
            raise APIError(400, "seed + n - 1 must stay below 2**63 (choice j is seeded seed + j)", param="seed")
        if len(prompts) * body.n > self.loop.capacity:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={body.n} is more generations than this server holds "
                                f"at once ({self.loop.capacity}); split the request", param="n")
        if max_tokens is not None and max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens={max_tokens} is above this server's limit of {self.max_tokens_limit}",
                           param="max_tokens")
        constraint = constraint_of(body)
        if constraint is not None:
            try:
                self.engine.grammars.matcher(constraint)  # compiled now, once for every choice
            except UserError as e:
                raise APIError(400, str(e), param=_constraint_param(body)) from None
        out = []
        for ids in prompts:
            room = self.max_seq_len - len(ids)
            wanted = min(room, self.max_tokens_limit) if max_tokens is None else max_tokens
            if max_tokens is None and wanted < 1:
                raise APIError(400, f"the prompt ({len(ids)} tokens) leaves no room for a reply in this model's "
                                    f"{self.max_seq_len} positions; shorten the prompt", param="prompt",
                               code="context_length_exceeded")
            if room < 0 or wanted > room:
                raise APIError(400, f"the prompt ({len(ids)} tokens) and max_tokens={wanted} need {len(ids) + wanted}"
                                    f" positions, but this model takes {self.max_seq_len}; shorten the prompt or ask "
                                    f"for fewer tokens", param="prompt", code="context_length_exceeded")
            for j in range(body.n):
                request = Request(ids, wanted, body.temperature, body.top_k, body.top_p if body.top_p < 1 else None,
                                  body.repetition_penalty, stop, None if body.seed is None else body.seed + j,
                                  logprobs=logprobs, prompt_logprobs=prompt_logprobs, constraint=constraint)
                try:
                    self.engine.check(request)
                except UserError as e:
                    raise APIError(400, str(e)) from None
                out.append(request)
        return out

    def submit(self, requests: list[Request], prompts: list[list[int]], http: HTTPRequest | None = None) -> Job:
        """Hand the generations to the engine's thread (429 when the slots and the queue are full)."""
        job = Job(requests, asyncio.get_running_loop(), asyncio.Queue())
        if self.request_timeout is not None:
            job.deadline = job.submitted + self.request_timeout
        if http is not None:  # what the request's log line reports
            http.state.model, http.state.prompt_tokens = self.name, sum(map(len, prompts))
        try:
            self.loop.submit(job)
        except Busy as e:
            raise APIError(429, f"{e}; retry shortly", code="server_busy") from None
        if http is not None:
            http.state.job = job
        return job

    # --- token text for logprobs
    def token_text(self, token: int) -> str:
        return self.engine.tokenizer.decode_bytes([token]).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> list[int]:
        return list(self.engine.tokenizer.decode_bytes([token]))


class Served:
    """The runs one process serves, by model id, and what they share: the engine slots (max_batch decoding at once,
    max_queue more waiting, across every model), the metrics registry, the API key and the drain."""

    def __init__(self, runs: list, model_names: list[str] | None = None, max_batch: int = 8, max_queue: int = 64,
                 checkpoint: str | None = None, model_name: str | None = None, **options):
        runs = [Path(r) for r in runs]
        if model_name is not None:  # the one-run spelling
            model_names = [model_name]
        if not runs:
            raise UserError("give at least one run directory to serve")
        if model_names and len(model_names) != len(runs):
            raise UserError(f"{len(model_names)} --model-name for {len(runs)} runs: give one per run, in order, or "
                            f"none (each model id is then its run folder's name)")
        if checkpoint is not None and len(runs) > 1:
            raise UserError("--checkpoint names a folder of one run; serve one run with it, or several without it")
        names = list(model_names or [r.resolve().name for r in runs])
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"two runs would both be served as {twice[0]!r}: give each a --model-name (in the order "
                            f"of the runs)")
        if max_batch < 1 or max_queue < 0:
            raise UserError(f"--max-batch={max_batch} must be at least 1 and --max-queue={max_queue} at least 0")
        self.slots, self.metrics = Slots(max_batch, max_queue), Metrics()
        self.metrics.slots.set(max_batch)
        self.servers: dict[str, Server] = {}
        # one engine is built (and warmed, compiled) at a time, and none serves before all are ready: torch's
        # compile settings are the process's, so a step of one engine must never run beside another's compile
        lock = threading.Lock()
        for run, name in zip(runs, names):
            self.servers[name] = Server(run, max_batch=max_batch, max_queue=max_queue, checkpoint=checkpoint,
                                        model_name=name, slots=self.slots, metrics=self.metrics, build_lock=lock,
                                        all_ready=self.ready, **options)
        self.first = next(iter(self.servers.values()))
        self.api_key, self.log_prompts = self.first.api_key, self.first.log_prompts
        self.draining = False  # set by a SIGTERM: new requests get 503, the running ones finish (drain())

    def ready(self) -> bool:
        return all(loop.ready.is_set() for loop in self.loops)

    def pick(self, model: str | None) -> Server:
        """The server of this model id (None: the first run's); 404 in OpenAI's shape for one not served here."""
        if model is None:
            return self.first
        server = self.servers.get(model)
        if server is None:
            names = ", ".join(map(repr, self.servers))
            raise APIError(404, f"model {model!r} is not served here; this server serves {names} (GET /v1/models)",
                           param="model", code="model_not_found")
        return server

    @property
    def loops(self) -> list[EngineLoop]:
        return [s.loop for s in self.servers.values()]

    @property
    def error(self) -> BaseException | None:
        return next((loop.error for loop in self.loops if loop.error is not None), None)

    def drain(self, seconds: float, done: Callable[[], None], active: Callable[[], int]) -> None:
        """What SIGTERM starts (on a thread of its own): new requests get 503 from now on; the generations running
        or queued get up to `seconds` to finish, then the rest end with finish_reason "shutdown"; once the
        responses in flight (active()) are written, done() lets the HTTP server exit."""
        self.draining = True

        def in_flight() -> int:
            return sum(loop.in_flight for loop in self.loops)
        log.info("draining: new requests get 503; %d generations in flight get up to %.0f s", in_flight(), seconds)
        deadline = time.monotonic() + seconds
        while (in_flight() > 0 or active() > 0) and time.monotonic() < deadline:  # (a body still arriving is
            time.sleep(0.05)                                                      # active, not in flight)
        if in_flight() > 0 or active() > 0:
            log.info("drain time is up: %d generations end with finish_reason 'shutdown'", in_flight())
        for loop in self.loops:
            loop.abort_all("shutdown")  # also whatever is submitted from now on
        until = time.monotonic() + 10
        while active() > 0 and time.monotonic() < until:
            time.sleep(0.05)
        done()


async def _checked(server: Server, prompts, body, max_tokens, logprobs, prompt_logprobs: bool = False):
    """server.requests, on a worker thread when the body has a constraint: compiling one (and, at the first,
    reading the tokenizer's vocabulary into llguidance) can take a second, which the event loop must not wait for."""
    if constraint_of(body) is None:
        return server.requests(prompts, body, max_tokens, logprobs, prompt_logprobs)
    return await asyncio.to_thread(server.requests, prompts, body, max_tokens, logprobs, prompt_logprobs)


def _check_text(text: str, param: str):
    """Text that cannot be UTF-8 (a lone surrogate from a JSON escape) is the client's error, not a 500 later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{param} holds invalid Unicode ({e.reason} at character {e.start})", param=param) from None


def _should_compile(choice: str, model) -> bool:
    """--compile auto: compile the decode step where it pays back its warm-up (tens of seconds on a CPU): on CUDA,
    and on a CPU with a C++ compiler for models of 20M parameters or more (Python overhead dominates below that
    less than the warm-up costs)."""
    if choice != "auto":
        return choice == "on"
    device = next(model.parameters()).device
    if device.type == "cuda":
        return True
    return shutil.which(os.environ.get("CXX", "g++")) is not None and model.num_params() >= 20_000_000


GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def constraint_of(body: _Sampling):
    """The request's structured-output constraint (structured.Constraint), or None."""
    fmt = body.response_format if body.response_format is not None and body.response_format.type != "text" else None
    given = [name for name in GUIDED if getattr(body, name) is not None] + (["response_format"] if fmt else [])
    if len(given) > 1:
        raise APIError(400, f"{' and '.join(given)} each constrain the output; give one", param=given[1])
    if fmt is not None:
        if fmt.type == "json_object":
            if fmt.json_schema is not None:
                raise APIError(400, "response_format of type json_object takes no json_schema; use type json_schema",
                               param="response_format")
            return Constraint.json_object()
        if fmt.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs json_schema: {name, schema}",
                           param="response_format")
        schema = fmt.json_schema.schema_
        return Constraint.json_object() if schema is None else Constraint.json_schema(schema)
    if body.guided_json is not None:
        return Constraint.json_schema(body.guided_json)
    if body.guided_regex is not None:
        return Constraint.regex(body.guided_regex)
    if body.guided_choice is not None:
        return Constraint.choice(body.guided_choice)
    if body.guided_grammar is not None:
        return Constraint.grammar(body.guided_grammar)
    return None


def _constraint_param(body: _Sampling) -> str:
    return next((name for name in GUIDED if getattr(body, name) is not None), "response_format")


def _refuse_unsupported(body: _Sampling):
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported; use repetition_penalty (CTRL's rule)", param=name)
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if getattr(body, "suffix", None):
        raise APIError(400, "suffix (insertion) is not supported by a left-to-right model", param="suffix")
    best_of = getattr(body, "best_of", None)
    if best_of is not None and best_of != body.n:
        raise APIError(400, "best_of other than n is not supported", param="best_of")


# --------------------------------------------------------------------------------------------- response formatting

class _Choice:
    """One choice's text, tokens and logprobs as its events arrive."""

    def __init__(self):
        self.text, self.tokens, self.logprobs = [], 0, []
        self.finish_reason: str | None = None

    def add(self, event) -> None:
        self.text.append(event.text)
        self.tokens += event.token is not None
        if event.logprob is not None:
            self.logprobs.append(event.logprob)
        if event.finished:
            self.finish_reason = event.finish_reason


def _floor(lp: float) -> float:
    return max(lp, LOGPROB_FLOOR)


def completion_logprobs(server: Server, records: list[Logprob | None], tokens: list[int], offset: int) -> dict:
    """The completions API's logprobs object; a None record is the prompt's first token (nothing scores it)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, record in zip(tokens, records):
        text = server.token_text(token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if record is None else _floor(record.logprob))
        if record is None:
            out["top_logprobs"].append(None)
        else:  # as OpenAI's: the alternatives, and the chosen token among them
            top = {server.token_text(t): _floor(lp) for t, lp in record.top}
            top.setdefault(text, _floor(record.logprob))
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(server: Server, records: list[Logprob]) -> dict:
    def entry(token, lp):
        return {"token": server.token_text(token), "logprob": _floor(lp), "bytes": server.token_bytes(token)}
    return {"content": [{**entry(r.token, r.logprob), "top_logprobs": [entry(t, lp) for t, lp in r.top]}
                        for r in records]}


def usage(prompts: list[list[int]], choices: list[_Choice]) -> dict:
    prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class _JobResponse(StreamingResponse):
    """A streamed response that cancels its job whenever it ends: finished, failed, or the client went away."""

    def __init__(self, content, server: Server, job: Job):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.server, self.job = server, job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.server.loop.cancel(self.job)


async def _events(job: Job, http: HTTPRequest | None = None):
    """(choice, Event) pairs of a job until every choice has finished. Without a stream, the client is polled
    twice a second: a client that went away cancels the job (ClientGone)."""
    left, checked = len(job.requests), time.monotonic()
    while left:
        try:
            choice, item = await asyncio.wait_for(job.events.get(), timeout=0.5 if http is not None else None)
        except TimeoutError:
            choice = item = None
        if http is not None and time.monotonic() - checked >= 0.5:
            checked = time.monotonic()
            if await http.is_disconnected():
                raise ClientGone()
        if item is None:
            continue
        if choice is None:  # the engine failed (its thread logged why)
            raise APIError(500, f"generation failed ({type(item).__name__}: {item}); see the server's log")
        left -= item.finished
        yield choice, item


class ClientGone(Exception):
    """The client of a non-streamed request disconnected before its answer was ready."""


def _chunk(kind: str, rid: str, created: int, model: str, choices: list, usage_now: dict | None,
           include_usage: bool) -> dict:
    """One streamed chunk; with stream_options.include_usage every chunk has "usage", null until the last."""
    out = {"id": rid, "object": kind, "created": created, "model": model, "choices": choices}
    if include_usage:
        out["usage"] = usage_now
    return out


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse_stream(chunks):
    """Server-Sent Events of a stream's chunks, ending with [DONE]; a failure mid-stream is an error event."""
    try:
        async for obj in chunks:
            yield _sse(obj)
    except APIError as e:
        yield _sse({"error": {"message": e.message, "type": "server_error", "param": None, "code": e.code}})
    yield "data: [DONE]\n\n"


# ------------------------------------------------------------------------------------------------------------- app

def create_app(runs: str | Path | list, max_body_bytes: int = 1 << 20, max_connections: int | None = None,
               client_timeout: float = 60.0, **options) -> FastAPI:
    """The FastAPI app serving one run or several (each its own model id, all sharing the slots); options are
    Served's and Server's. Each engine loads on its own thread at startup. max_connections: requests handled at
    once (streams included) past which new ones get 503; client_timeout: seconds a client may take to send its
    body or to take the next part of its answer before it is dropped."""
    if max_connections is not None and max_connections < 1:
        raise UserError(f"--max-connections={max_connections} must be at least 1")
    if not client_timeout > 0:
        raise UserError(f"--client-timeout={client_timeout} must be a positive number of seconds")
    from contextlib import asynccontextmanager

    served = Served(runs if isinstance(runs, (list, tuple)) else [runs], **options)

    @asynccontextmanager
    async def lifespan(app):
        for loop in served.loops:
            loop.start()
        yield
        for loop in served.loops:  # a warm-up in progress is not waited for (daemon thread)
            await asyncio.to_thread(loop.stop, 2.0)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.served, app.state.server = served, served.first

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_body(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        if first.get("type") == "json_invalid":
            return error_body(400, f"the body is not valid JSON ({first.get('ctx', {}).get('error', 'parse error')})")
        if not where and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_body(400, "the body must be a JSON object (send it with Content-Type: application/json)")
        return error_body(400, f"{where or 'body'}: {first.get('msg')}", param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        response = error_body(e.status_code, str(e.detail))
        response.headers.update(e.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(ClientGone)
    async def _gone(request, e: ClientGone):
        return Response(status_code=499)  # nobody reads it; the job is already cancelled

    @app.exception_handler(Exception)
    async def _bug(request, e: Exception):
        if isinstance(e, ClientStalled):  # not a failure of ours: Front ends the request
            return Response(status_code=499)
        log.exception("request failed")
        return error_body(500, f"internal error ({type(e).__name__}); see the server's log")

    async def authorized(request: HTTPRequest):
        if served.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), served.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if served.error is not None:
            return JSONResponse({"status": "failed", "error": str(served.error)}, status_code=503)
        if not served.ready():
            return JSONResponse({"status": "loading"}, status_code=503)
        if served.draining:  # a load balancer takes this replica out
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": "5"})
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(served.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    def card(server: Server) -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "lmforge",
                "max_model_len": server.max_seq_len}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [card(server) for server in served.servers.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorized)])
    async def model(model_id: str):
        return card(served.pick(model_id))

    # vLLM's tokenizer routes, which lm-eval's local-completions finds and uses instead of a local tokenizer; open
    # like vLLM's (its key guards /v1 only): they tell the tokenizer, never run the model
    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        server = served.pick(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt (text) or messages (a conversation)", param="prompt")
        if body.messages is not None:
            ids = server.chat_prompt(body.messages, body.add_generation_prompt)
            return {"tokens": ids, "count": len(ids), "max_model_len": server.max_seq_len}
        _check_text(body.prompt, "prompt")
        tokenizer = server.engine.tokenizer
        try:
            ids = tokenizer.encode_with_specials(body.prompt)
        except UserError as e:
            raise APIError(400, f"prompt: {e}", param="prompt") from None
        if body.add_special_tokens and getattr(tokenizer, "add_bos", False):
            ids = [tokenizer.bos_id] + ids
        return {"tokens": ids, "count": len(ids), "max_model_len": server.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        server = served.pick(body.model)
        try:
            return {"prompt": server.engine.tokenizer.decode(body.tokens)}
        except UserError as e:
            raise APIError(400, f"tokens: {e}", param="tokens") from None

    @app.get("/tokenizer_info")
    async def tokenizer_info(model: str | None = None):
        server = served.pick(model)
        tokenizer = server.engine.tokenizer
        specials = {i: s for s, i in tokenizer.special_tokens.items()}
        eos = specials.get(tokenizer.eot_id) or tokenizer.decode([tokenizer.eot_id])
        bos_id = getattr(tokenizer, "bos_id", None)
        pad_id = getattr(tokenizer, "pad_id", None)
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": eos,
                "bos_token": eos if bos_id is None else tokenizer.decode([bos_id]),  # ours begin after end-of-text
                "pad_token": None if pad_id is None else tokenizer.decode([pad_id]),
                "chat_template": server.chat_template, "model_max_length": server.max_seq_len,
                "vocab_size": tokenizer.vocab_size}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: CompletionRequest, http: HTTPRequest):
        server = served.pick(body.model)
        prompts = server.prompts(body.prompt)
        scored = body.echo and body.logprobs is not None
        # OpenAI's default for completions (16), within this server's limit
        max_tokens = min(16, server.max_tokens_limit) if body.max_tokens is None else body.max_tokens
        requests = await _checked(server, prompts, body, max_tokens, body.logprobs, prompt_logprobs=scored)
        job = server.submit(requests, prompts, http)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        http.state.response_id = rid
        if served.log_prompts:
            http.state.prompt = body.prompt
        choices = [_Choice() for _ in requests]
        echoes = [text if isinstance(text, str) else server.engine.tokenizer.decode(ids)
                  for ids, text in zip(prompts, body.prompt if isinstance(body.prompt, list) and not
                                       isinstance(body.prompt[0], int) else [body.prompt])]
        echoed, offsets = [False] * len(requests), [0] * len(requests)

        def piece(i: int, event) -> tuple[str, dict | None]:
            """A choice's new text and logprobs for this event; the first one starts with the echoed prompt."""
            text, records, tokens = event.text, [], []
            if body.echo and not echoed[i]:
                echoed[i] = True
                text = echoes[i // body.n] + text
                if scored:  # (a choice that ended before its prefill, in the queue, has no scores to give)
                    tokens = list(prompts[i // body.n])
                    scores = list(event.prompt_logprobs or [None] * (len(tokens) - 1))
                    records = [None] + scores
            if event.logprob is not None:
                records.append(event.logprob)
                tokens.append(event.token)
            logprobs = None
            if body.logprobs is not None:
                logprobs = completion_logprobs(server, records, tokens, offsets[i])
                offsets[i] += sum(len(t) for t in logprobs["tokens"])
            return text, logprobs

        def chunk(choice_list: list, with_usage: bool = False) -> dict:
            return _chunk("text_completion", rid, created, server.name, choice_list,
                          usage(prompts, choices) if with_usage else None, include_usage)

        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        if body.stream:
            async def stream():
                async for i, event in _events(job):
                    text, logprobs = piece(i, event)
                    choices[i].add(event)
                    yield chunk([{"index": i, "text": text, "logprobs": logprobs,
                                  "finish_reason": event.finish_reason}])
                if include_usage:
                    yield chunk([], with_usage=True)
            return _JobResponse(_sse_stream(stream()), server, job)

        texts, logprobs = [[] for _ in requests], [None] * len(requests)
        try:
            async for i, event in _events(job, http):
                text, lp = piece(i, event)
                choices[i].add(event)
                texts[i].append(text)
                if lp is not None:
                    logprobs[i] = lp if logprobs[i] is None else {k: logprobs[i][k] + lp[k] for k in lp}
        finally:
            server.loop.cancel(job)
        return {"id": rid, "object": "text_completion", "created": created, "model": server.name,
                "choices": [{"index": i, "text": "".join(texts[i]), "logprobs": logprobs[i],
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": usage(prompts, choices)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, http: HTTPRequest):
        server = served.pick(body.model)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        prompts = [server.chat_prompt(body.messages)]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        requests = await _checked(server, prompts, body, max_tokens,
                                  (body.top_logprobs or 0) if body.logprobs else None)
        job = server.submit(requests, prompts, http)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        http.state.response_id = rid
        if served.log_prompts:
            http.state.prompt = [m.model_dump() for m in body.messages]
        choices = [_Choice() for _ in requests]
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)

        def chunk(choice_list: list, with_usage: bool = False) -> dict:
            return _chunk("chat.completion.chunk", rid, created, server.name, choice_list,
                          usage(prompts, choices) if with_usage else None, include_usage)

        if body.stream:
            async def stream():
                for i in range(len(requests)):
                    yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                async for i, event in _events(job):
                    choices[i].add(event)
                    delta = {"content": event.text} if event.text or not event.finished else {}
                    logprobs = chat_logprobs(server, [event.logprob]) if event.logprob is not None else None
                    yield chunk([{"index": i, "delta": delta, "logprobs": logprobs,
                                  "finish_reason": event.finish_reason}])
                if include_usage:
                    yield chunk([], with_usage=True)
            return _JobResponse(_sse_stream(stream()), server, job)

        try:
            async for i, event in _events(job, http):
                choices[i].add(event)
        finally:
            server.loop.cancel(job)
        return {"id": rid, "object": "chat.completion", "created": created, "model": server.name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": "".join(c.text)},
                             "logprobs": chat_logprobs(server, c.logprobs) if body.logprobs else None,
                             "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
                "usage": usage(prompts, choices)}

    from .openapi import describe
    describe(app)
    return Front(BodyLimit(app, max_body_bytes, client_timeout), served, max_connections, client_timeout)


class ClientStalled(Exception):
    """A client took longer than the client timeout to take the next part of its answer."""


def _abort(send) -> None:
    """Cut the connection under an ASGI send at once, its unsent bytes dropped (ASGI has no way to say so; uvicorn's
    send is a method of its request cycle, which holds the transport). A closed one would wait for a client that
    reads nothing."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "abort"):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:  # a reset: the kernel drops what the client never took instead of holding it
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


class Front:
    """ASGI wrapper in front of everything: while the server drains, new requests get 503 with Retry-After (health
    and metrics still answer), as do requests past max_active handled at once; a client that does not take the
    next part of its answer within client_timeout is dropped; every request ends with one structured log line on
    the logger lmforge.serve.requests (id, model, tokens in and out, time to first token, total time, finish
    reasons, status; the prompt only with log_prompts)."""

    def __init__(self, app, served: Served, max_active: int | None = None, client_timeout: float = 60.0):
        self.app, self.served, self.active, self.max_active = app, served, 0, max_active
        self.client_timeout = client_timeout
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), {"code": None, "stalled": False}
        exempt = scope["path"] in ("/health", "/metrics")
        refused = None
        if self.served.draining and not exempt:
            refused = error_body(503, "the server is shutting down; retry on another replica or in a moment",
                                 code="shutting_down")
        elif self.max_active is not None and self.active >= self.max_active and not exempt:
            refused = error_body(503, f"the server is handling {self.active} requests, its limit "
                                      f"(--max-connections); retry in a moment", code="too_many_connections")
        if refused is not None:
            refused.headers["Retry-After"] = "5" if self.served.draining else "1"
            status["code"] = 503
            await refused(scope, receive, send)
            return self._log(scope, status, start)

        async def sending(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            try:
                async with asyncio.timeout(self.client_timeout):  # (no task per message, as wait_for makes)
                    await send(message)
            except TimeoutError:  # the client stopped reading: its connection is cut, its job cancelled
                status["stalled"] = True
                _abort(send)
                raise ClientStalled() from None
        self.active += 1
        try:
            await self.app(scope, receive, sending)
        except ClientStalled:
            pass
        finally:
            self.active -= 1
            self._log(scope, status, start)

    def _log(self, scope, status: dict, start: float) -> None:
        if not requests_log.isEnabledFor(logging.INFO):
            return
        state = scope.get("state") or {}
        job = state.get("job")
        record = {"id": state.get("response_id"), "method": scope["method"], "path": scope["path"],
                  "status": status["code"], "seconds": round(time.monotonic() - start, 4)}
        if "model" in state:
            record.update(model=state["model"], prompt_tokens=state.get("prompt_tokens"))
        if job is not None:
            record.update(completion_tokens=job.tokens_out,
                          ttft=None if job.first_token is None else round(job.first_token - job.submitted, 4),
                          finish_reasons=job.finish_reasons)
        if status["stalled"] or status["code"] == 499 or (  # the client left before every choice had ended
                job is not None and status["code"] == 200 and len(job.finish_reasons) < len(job.requests)):
            record["client_gone"] = True
        if self.served.log_prompts and "prompt" in state:
            record["prompt"] = state["prompt"]
        requests_log.info(json.dumps(record, ensure_ascii=False))


class BodyLimit:
    """ASGI wrapper: a request body over the limit gets 413 before the app sees it (the body is read whole first,
    which the limit keeps small), and one that does not arrive within the client timeout gets 408."""

    def __init__(self, app: FastAPI, limit: int, timeout: float = 60.0):
        self.app, self.limit, self.timeout = app, limit, timeout
        self.state = app.state  # the app's state, reachable from the wrapper

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = error_body(413, f"the request body is larger than this server's limit of {self.limit} bytes")
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big(scope, receive, send)
        body, more, until = [], True, time.monotonic() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(until - time.monotonic(), 0.001))
            except TimeoutError:
                response = error_body(408, f"the request body did not arrive within {self.timeout:g} s "
                                           f"(--client-timeout); send it whole", code="request_timeout")
                response.headers["Connection"] = "close"
                return await response(scope, receive, send)
            if message["type"] != "http.request":  # the client left while sending
                return
            body.append(message.get("body", b""))
            more = message.get("more_body", False)
            if sum(map(len, body)) > self.limit:
                return await too_big(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
