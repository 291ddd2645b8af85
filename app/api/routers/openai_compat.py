"""The OpenAI-compatible API: ``/v1/completions``, ``/v1/chat/completions`` (both also streamed as
server-sent events) and ``/v1/models``, so an OpenAI client gets the edited model unchanged.

Each prompt is answered by the answer path of ``/answer`` (the selector routes it; the routed
edit's adapter writes the target, the base model the rest), so the text is what ``/answer``
returns for the same query, form, token budget and sampling. Every response names the edit that
served it: a ``factpatch`` object (``edit_id``, ``similarity``) in the body and in every stream
chunk, and the ``X-Factpatch-Edit-Id`` / ``X-Factpatch-Similarity`` headers.

Differences from OpenAI's API, each refused with a 422 rather than ignored when asked for:
one choice per prompt (``n`` = 1), one user message per chat request (the selector routes that
message), no log-probabilities, tools, echo, suffix or ``best_of``. Decoding is greedy unless
``temperature`` > 0 is given (OpenAI samples at temperature 1 by default; factpatch answers
reproducibly). A stream sends the finished answer piece by piece: an edited answer is written in
two steps (adapter, then base model), and the pieces come once both are done.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator, Literal

from fastapi import APIRouter, Depends, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.api import deps
from app.api.routers._params import AUTH, BEARER_OR_PUBLIC, responses
from app.api.schemas import MIN_TEMPERATURE, storable
from app.errors import Unprocessable
from app.runtime import Runtime
from app.services.completions import Completion

router = APIRouter(prefix="/v1", tags=["openai"])

MAX_STOP = 4
MAX_STOP_CHARS = 200


class FactpatchInfo(BaseModel):
    edit_id: str | None = Field(description="The edit whose adapter served this answer; null: the base model.")
    similarity: float | None = Field(description="The selector's similarity to that edit's nearest key.")


class _Request(BaseModel):
    """Fields OpenAI's API defines; unknown fields are ignored (as OpenAI-compatible servers do),
    known ones factpatch cannot honour are refused."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=200, description="Any name; the served model answers (see /v1/models).")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate (1..FACTPATCH_MAX_NEW_TOKENS_LIMIT).")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False,
                                      description="0 or absent: greedy; above 0: sampling at this temperature.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False, description="Nucleus mass when sampling.")
    n: int | None = Field(default=None, ge=1, description="Choices per prompt; only 1.")
    stream: bool | None = Field(default=False, description="Send server-sent events (`data: {chunk}` ... `data: [DONE]`).")
    stream_options: dict[str, Any] | None = Field(default=None, description="`{\"include_usage\": true}` adds a usage chunk.")
    stop: str | list[str] | None = Field(default=None, description=f"Up to {MAX_STOP} sequences that end the text.")
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1, description="Seed for reproducible sampling.")
    logprobs: Any = Field(default=None, description="Not supported (refused when set).")
    best_of: int | None = Field(default=None, ge=1, description="Only 1.")
    echo: bool | None = Field(default=None, description="Not supported (refused when true).")
    suffix: str | None = Field(default=None, description="Not supported (refused when set).")
    tools: list[Any] | None = Field(default=None, description="Not supported (refused when non-empty).")
    functions: list[Any] | None = Field(default=None, description="Not supported (refused when non-empty).")
    response_format: dict[str, Any] | None = Field(default=None, description="Only `{\"type\": \"text\"}`.")


class CompletionIn(_Request):
    prompt: str | list[str] = Field(description="A prompt, or a list of prompts (each routed on its own).")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(max_length=32)
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionIn(_Request):
    messages: list[ChatMessage] = Field(min_length=1, description="One user message (the question to answer).")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Same as `max_tokens`.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"]
    factpatch: FactpatchInfo


class CompletionOut(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    factpatch: FactpatchInfo = Field(description="The edit that served the first choice.")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionOut(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    factpatch: FactpatchInfo


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


_STREAM = {"text/event-stream": {"schema": {"type": "string"},
                                 "example": 'data: {"id": "...", "choices": [...]}\n\ndata: [DONE]\n\n'}}


# -- validation ---------------------------------------------------------------------------------
def _unsupported(message: str) -> Unprocessable:
    return Unprocessable(message, code="unsupported_parameter")


def _check_common(rt: Runtime, body: _Request, max_tokens: int | None) -> dict[str, Any]:
    if body.n not in (None, 1) or body.best_of not in (None, 1):
        raise _unsupported("n / best_of: factpatch returns one choice per prompt")
    if body.logprobs not in (None, False, 0):
        raise _unsupported("logprobs are not supported")
    if body.echo:
        raise _unsupported("echo is not supported")
    if body.suffix:
        raise _unsupported("suffix is not supported")
    if body.tools or body.functions:
        raise _unsupported("tools and functions are not supported")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _unsupported("response_format: only {\"type\": \"text\"} is supported")
    n = rt.settings.default_max_new_tokens if max_tokens is None else max_tokens
    if not 1 <= n <= rt.settings.max_new_tokens_limit:
        raise Unprocessable(f"max_tokens must be in 1..{rt.settings.max_new_tokens_limit}", code="invalid_request")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise Unprocessable(f"stop: at most {MAX_STOP} sequences of at most {MAX_STOP_CHARS} characters",
                            code="invalid_request")
    for s in stop:
        _text(s, "stop")
    sample = bool(body.temperature)
    return dict(
        max_tokens=n, stop=stop, do_sample=sample,
        temperature=max(MIN_TEMPERATURE, body.temperature) if sample else 1.0,
        top_p=body.top_p if (sample and body.top_p) else 1.0, seed=body.seed,
    )


def _text(value: str, where: str) -> str:
    try:
        storable(value)
    except ValueError as exc:
        raise Unprocessable(f"{where}: {exc}", code="invalid_request") from None
    return value


def _query(rt: Runtime, value: str, where: str) -> str:
    _text(value, where)
    if not value.strip() or len(value) > rt.settings.max_query_chars:
        raise Unprocessable(f"{where} must be 1..{rt.settings.max_query_chars} characters, not blank",
                            code="invalid_request")
    return value


def _chat_query(rt: Runtime, messages: list[ChatMessage]) -> str:
    if len(messages) != 1 or messages[0].role != "user":
        raise Unprocessable(
            "messages: factpatch answers one user message per request (the selector routes that message); "
            "send the question as the only message, with role user",
            code="unsupported_messages",
        )
    content = messages[0].content
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise Unprocessable("messages[0].content: only text parts are supported", code="unsupported_messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise Unprocessable("messages[0].content must be text", code="invalid_request")
    return _query(rt, content, "messages[0].content")


def _mode(rt: Runtime, chat: bool):
    if chat and not rt.lm.has_chat_template:
        raise Unprocessable("this model has no chat template; use /v1/completions", code="chat_unsupported")
    return "chat" if chat else "completion"


# -- responses ----------------------------------------------------------------------------------
def _info(c: Completion) -> FactpatchInfo:
    return FactpatchInfo(edit_id=c.edit_id, similarity=c.similarity)


def _headers(c: Completion) -> dict[str, str]:
    headers = {"X-Factpatch-Edit-Id": c.edit_id or ""}
    if c.similarity is not None:
        headers["X-Factpatch-Similarity"] = f"{c.similarity:.6f}"
    return headers


def _usage(items: list[Completion]) -> Usage:
    p, c = sum(i.prompt_tokens for i in items), sum(i.completion_tokens for i in items)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _stream(rt: Runtime, body: _Request, items: list[Completion], *, chat: bool, ident: str, created: int) -> Iterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, c: Completion, piece: str | None, finish: str | None, first: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if piece is not None:
                delta["content"] = piece
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"text": piece or "", "index": index, "logprobs": None, "finish_reason": finish}
        return {"id": ident, "object": obj, "created": created, "model": c.model, "choices": [choice],
                "factpatch": _info(c).model_dump()}

    for index, c in enumerate(items):
        if chat:
            yield _sse(chunk(index, c, "", None, first=True))
        for piece in rt.completions.pieces(c.text):
            yield _sse(chunk(index, c, piece, None))
        yield _sse(chunk(index, c, None if chat else "", c.finish_reason))
    if (body.stream_options or {}).get("include_usage"):
        yield _sse({"id": ident, "object": obj, "created": created, "model": items[0].model, "choices": [],
                    "usage": _usage(items).model_dump()})
    yield _sse("[DONE]")


async def _run(rt: Runtime, queries: list[str], mode: str, opts: dict[str, Any]) -> list[Completion]:
    return await run_in_threadpool(rt.completions.complete, queries, mode=mode, **opts)


# -- routes -------------------------------------------------------------------------------------
@router.post(
    "/completions", response_model=CompletionOut, summary="OpenAI-compatible text completion through the selector",
    responses={200: {"content": _STREAM, "description": "JSON, or server-sent events with `stream: true`."},
               **responses(400, *AUTH, 422)},
    openapi_extra={"security": BEARER_OR_PUBLIC},
)
async def completions(body: CompletionIn, response: Response, rt: Runtime = Depends(deps.runtime),
                      _=Depends(deps.reader_or_public)):
    opts = _check_common(rt, body, body.max_tokens)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not 1 <= len(prompts) <= rt.settings.max_batch:
        raise Unprocessable(f"prompt: 1..{rt.settings.max_batch} prompts", code="invalid_request")
    queries = [_query(rt, p, f"prompt[{i}]" if len(prompts) > 1 else "prompt") for i, p in enumerate(prompts)]
    items = await _run(rt, queries, _mode(rt, False), opts)
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_stream(rt, body, items, chat=False, ident=ident, created=created),
                                 media_type="text/event-stream", headers=_headers(items[0]))
    response.headers.update(_headers(items[0]))
    return CompletionOut(
        id=ident, created=created, model=items[0].model, usage=_usage(items), factpatch=_info(items[0]),
        choices=[CompletionChoice(text=c.text, index=i, finish_reason=c.finish_reason, factpatch=_info(c))
                 for i, c in enumerate(items)],
    )


@router.post(
    "/chat/completions", response_model=ChatCompletionOut,
    summary="OpenAI-compatible chat completion through the selector",
    responses={200: {"content": _STREAM, "description": "JSON, or server-sent events with `stream: true`."},
               **responses(400, *AUTH, 422)},
    openapi_extra={"security": BEARER_OR_PUBLIC},
)
async def chat_completions(body: ChatCompletionIn, response: Response, rt: Runtime = Depends(deps.runtime),
                           _=Depends(deps.reader_or_public)):
    if body.max_tokens is not None and body.max_completion_tokens is not None and body.max_tokens != body.max_completion_tokens:
        raise Unprocessable("max_tokens and max_completion_tokens differ", code="invalid_request")
    opts = _check_common(rt, body, body.max_completion_tokens or body.max_tokens)
    query = _chat_query(rt, body.messages)
    items = await _run(rt, [query], _mode(rt, True), opts)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        return StreamingResponse(_stream(rt, body, items, chat=True, ident=ident, created=created),
                                 media_type="text/event-stream", headers=_headers(items[0]))
    c = items[0]
    response.headers.update(_headers(c))
    return ChatCompletionOut(
        id=ident, created=created, model=c.model, usage=_usage(items), factpatch=_info(c),
        choices=[ChatChoice(index=0, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)],
    )


@router.get("/models", response_model=ModelList, summary="The served model (OpenAI-compatible)",
            responses=responses(*AUTH), openapi_extra={"security": BEARER_OR_PUBLIC})
async def models(rt: Runtime = Depends(deps.runtime), _=Depends(deps.reader_or_public)) -> ModelList:
    return ModelList(data=[ModelOut(id=rt.lm.name, created=int(rt.started_at), owned_by="factpatch")])
