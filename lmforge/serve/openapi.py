"""The server's OpenAPI document, as its responses really are: each route's success body as a model, streams as
Server-Sent Events, the metrics as Prometheus text, and every refusal in OpenAI's error shape with the statuses the
server sends (400 for a body it cannot take, never FastAPI's 422). Clients generated from /openapi.json, and
schemathesis checking the server against it, see what the server does. Documentation only: the routes build their
bodies themselves, and a test checks that each one matches."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "draining"]
    error: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Tokens(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    eos_token: str
    bos_token: str
    pad_token: str | None
    chat_template: str
    model_max_length: int
    vocab_size: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


SUCCESS = {  # (method, path) -> the 200 body's model, or a content type and its schema
    ("get", "/health"): Health, ("get", "/v1/models"): ModelList, ("get", "/v1/models/{model_id}"): ModelCard,
    ("post", "/tokenize"): Tokens, ("post", "/detokenize"): Detokenized, ("get", "/tokenizer_info"): TokenizerInfo,
    ("post", "/v1/completions"): Completion, ("post", "/v1/chat/completions"): ChatCompletion,
}
REFUSALS = {  # (method, path) -> the statuses it may refuse with, besides 503 (draining, too many requests)
    ("get", "/health"): [], ("get", "/metrics"): [], ("get", "/"): [], ("get", "/tokenizer_info"): [404],
    ("get", "/v1/models"): [401], ("get", "/v1/models/{model_id}"): [401, 404],
    ("post", "/tokenize"): [400, 404, 408, 413], ("post", "/detokenize"): [400, 404, 408, 413],
    ("post", "/v1/completions"): [400, 401, 404, 408, 413, 429],
    ("post", "/v1/chat/completions"): [400, 401, 404, 408, 413, 429],
}
STREAMED = {("post", "/v1/completions"), ("post", "/v1/chat/completions")}
WHY = {400: "the body or a value in it cannot be served (the message names it)", 401: "missing or wrong API key",
       404: "no such model or route", 408: "the body did not arrive within --client-timeout", 413: "the body is over the server's limit", 429: "slots and queue are full",
       503: "loading, draining for shutdown, or at --max-connections (Retry-After says when to come back)"}


def _allows_null(prop: dict) -> bool:
    return prop.get("type") == "null" or any(p.get("type") == "null" for p in prop.get("anyOf", []))


def describe(app) -> None:
    """Replace the app's OpenAPI document with one whose responses are the server's (called once, at startup)."""
    from fastapi.openapi.utils import get_openapi

    def document() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        spec = get_openapi(title="lmforge", version=app.version, routes=app.routes,
                           description="An OpenAI-compatible server over an lmforge run.")
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for body in components.values():  # request bodies: null in a field with a default means the default
            for name, prop in body.get("properties", {}).items():
                if name not in body.get("required", []) and not _allows_null(prop):
                    body["properties"][name] = {"anyOf": [prop, {"type": "null"}], **(
                        {"default": prop["default"]} if "default" in prop else {})}
        models = [ErrorBody, *SUCCESS.values()]
        from pydantic.json_schema import models_json_schema
        _, defs = models_json_schema([(m, "serialization") for m in models], ref_template="#/components/schemas/{model}")
        components.update(defs.get("$defs", {}))

        def ref(model) -> dict:
            return {"$ref": f"#/components/schemas/{model.__name__}"}
        for path, methods in spec.get("paths", {}).items():
            for method, operation in methods.items():
                key = (method, path)
                responses = {}
                if key == ("get", "/metrics"):
                    responses["200"] = {"description": "Prometheus text",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}
                elif key == ("get", "/"):
                    responses["200"] = {"description": "the playground page",
                                        "content": {"text/html": {"schema": {"type": "string"}}}}
                else:
                    content = {"application/json": {"schema": ref(SUCCESS[key])}}
                    if key in STREAMED:  # each event's data: a chunk as JSON, an error object, or [DONE] last
                        content["text/event-stream"] = {"schema": {
                            "type": "object", "required": ["data"],
                            "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}
                    responses["200"] = {"description": "OK (with stream: true, Server-Sent Events)"
                                        if key in STREAMED else "OK", "content": content}
                for status in [*REFUSALS.get(key, [400, 404]), 503]:
                    if key == ("get", "/health") and status == 503:
                        responses["503"] = {"description": WHY[503], "content": {
                            "application/json": {"schema": {"anyOf": [ref(Health), ref(ErrorBody)]}}}}
                        continue
                    responses[str(status)] = {"description": WHY[status],
                                              "content": {"application/json": {"schema": ref(ErrorBody)}}}
                operation["responses"] = responses
        app.openapi_schema = spec
        return spec
    app.openapi = document
