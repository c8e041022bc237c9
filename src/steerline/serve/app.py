"""The HTTP endpoints, OpenAI's wire format: GET /v1/models, POST /v1/chat/completions and
/v1/completions (streamed as server-sent events with "stream": true), GET /v1/steering (what
this server may apply).

Decoding is greedy (temperature 0 or absent, n = 1). A chat request is one user turn, rendered
by steerline's chat rule (`render_chat`, as `steerline generate`); a completion prompt is text
(tokenized with the tokenizer's special tokens) or token ids. The body's `steering` object
(steerline.serve.steering) steers the request; the response's `steering` field says what was
applied (and, with a gate, its score and whether it fired). A bad request is HTTP 400 with one
line saying what to fix, in OpenAI's error form {"error": {"message": ...}}.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from transformers import PreTrainedTokenizerBase

from steerline.core.chat import render_chat
from steerline.core.errors import UserError, one_line
from steerline.mat_steer.generate import prompt_ids
from steerline.serve.artifacts import Artifacts
from steerline.serve.engine import SteeredEngine
from steerline.serve.steering import BadRequest, ModelShape, Requested, decide_gate, parse_steering
from steerline.steering.capture import check_context
from steerline.steering.request import Steering

DEFAULT_MAX_TOKENS = 256  # when a request gives none (capped by the context left)
MAX_STOPS = 4  # OpenAI's limit on `stop` strings


@dataclass
class Service:
    engine: SteeredEngine
    tokenizer: PreTrainedTokenizerBase
    artifacts: Artifacts
    shape: ModelShape
    name: str  # the model id clients send
    max_context: int
    created: int
    # the steering of requests that send none (for clients that cannot add a field)
    default_steering: dict[str, Any] | None = None


@dataclass
class _Job:
    """One parsed request, ready to run."""

    ids: list[int]
    max_tokens: int
    stop: list[str]
    stream: bool
    requested: Requested
    user_text: str | None  # what a gate scores (chat requests only)


def build_app(svc: Service) -> FastAPI:
    app = FastAPI(title="steerline serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(_request: Request, err: BadRequest) -> JSONResponse:
        return _error(400, one_line(err))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": svc.name, "object": "model",
                                            "created": svc.created, "owned_by": "steerline"}]}

    @app.get("/v1/steering")
    async def steering() -> dict[str, Any]:
        arts = svc.artifacts
        d = arts.defaults
        return {"experts": arts.names.get("experts"), "mode": d.mode, "n": d.n, "delta": d.delta,
                "moe_layers": list(svc.shape.moe_layers), "n_experts": svc.shape.n_experts,
                "top_k": svc.shape.top_k,
                "mat_steer": None if arts.mat is None else {
                    "checkpoint": arts.names["mat_steer"], "attributes": arts.mat[1].attributes,
                    "layer": arts.mat[1].layer},
                "gates": {s: {"layer": g.layer, "threshold": g.threshold}
                          for s, g in arts.gates.items()}}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await _body(request, svc.name)
        text = _user_turn(body.get("messages"))
        try:
            ids = render_chat(svc.tokenizer, text).ids
        except (UserError, ValueError) as err:
            raise BadRequest(f"messages: {one_line(err)}") from None
        job = _job(svc, body, ids, text)
        return await _respond(svc, job, "chat.completion")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _body(request, svc.name)
        ids = _completion_prompt(svc, body.get("prompt"))
        job = _job(svc, body, ids, None)
        return await _respond(svc, job, "text_completion")

    return app


# ---- parsing ---------------------------------------------------------------------------------


async def _body(request: Request, name: str) -> dict[str, Any]:
    """The JSON object of a request for model `name`."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("the request body is not UTF-8: send a JSON object") from None
    except json.JSONDecodeError as err:
        raise BadRequest(f"the request body is not valid JSON ({err.msg} at character "
                         f"{err.pos}): send a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    if body.get("model") != name:
        raise BadRequest(f"model {body.get('model')!r} is not served here: use {name!r} "
                         "(GET /v1/models)")
    return body


def _user_turn(messages: object) -> str:
    fix = 'messages must be one user turn: [{"role": "user", "content": "..."}]'
    if not (isinstance(messages, list) and len(messages) == 1 and isinstance(messages[0], dict)
            and messages[0].get("role") == "user"):
        raise BadRequest(fix)
    content = messages[0].get("content")
    if isinstance(content, list):  # OpenAI's content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise BadRequest("messages[0].content parts must all be {\"type\": \"text\", "
                             "\"text\": \"...\"}")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(fix)
    return content


def _completion_prompt(svc: Service, prompt: object) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt_ids(svc.tokenizer, [prompt], chat=False)[0]
    vocab = len(svc.tokenizer)
    if (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt)):
        return list(prompt)
    raise BadRequest(f"prompt must be a non-empty string or a list of token ids in 0..{vocab - 1}"
                     " (one prompt per request)")


def _job(svc: Service, body: dict[str, Any], ids: list[int], user_text: str | None) -> _Job:
    temperature = body.get("temperature")
    if temperature not in (None, 0, 0.0):
        raise BadRequest(f"steerline serve decodes greedily: set temperature 0 or leave it out "
                         f"(got {temperature!r})")
    if body.get("n") not in (None, 1):
        raise BadRequest(f"n must be 1 (greedy decoding gives one answer), got {body['n']!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, got {stream!r}")
    room = svc.max_context - len(ids)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = max(1, min(DEFAULT_MAX_TOKENS, room))
    if not (isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise BadRequest(f"max_tokens must be an int >= 1, got {max_tokens!r}")
    try:
        check_context([ids], ["of this request"], max_tokens, svc.max_context)
    except ValueError as err:
        raise BadRequest(one_line(err)) from None
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOPS
            and all(isinstance(s, str) and s for s in stop)):
        raise BadRequest(f"stop must be a string or a list of up to {MAX_STOPS} non-empty "
                         "strings")
    requested = parse_steering(body.get("steering", svc.default_steering), svc.artifacts,
                               svc.shape)
    if requested.gate is not None and user_text is None:
        raise BadRequest("steering.gate scores a user turn: send the prompt to "
                         "/v1/chat/completions")
    return _Job(ids, max_tokens, stop, stream, requested, user_text)


# ---- generation ------------------------------------------------------------------------------


async def _pieces(svc: Service, job: _Job, steering: Steering | None
                  ) -> AsyncIterator[tuple[str, str | None, int]]:
    """(new text, finish reason or None, tokens so far) as the engine produces tokens; text
    stops before a `stop` string (the request is then ended) and is held back while it ends in
    an incomplete character or could be the start of a stop string."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue = asyncio.Queue()

    def emit(tokens: list[int], reason: str | None, err: BaseException | None) -> None:
        loop.call_soon_threadsafe(inbox.put_nowait, (tokens, reason, err))

    rid = svc.engine.submit(job.ids, job.max_tokens, steering, emit)
    tokens: list[int] = []
    sent = ""
    done = ended = False  # done: this answer is complete; ended: the engine finished it
    try:
        while not done:
            new, reason, err = await inbox.get()
            if err is not None:
                ended = True
                raise RuntimeError(f"generation failed: {one_line(err)}")
            ended = reason is not None
            tokens += new
            text = svc.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
            if hits:
                text, reason = text[: min(hits)], "stop"
            done = reason is not None
            if not done:
                text = text[: len(text) - _held_back(text, job.stop)]
            if len(text) > len(sent) or done:
                yield text[len(sent):], reason, len(tokens)
                sent = text
    finally:
        if not ended:  # a stop string or a client that went away
            svc.engine.cancel(rid)


def _held_back(text: str, stops: list[str]) -> int:
    """How many final characters of `text` to hold back: an incomplete UTF-8 character, or a
    suffix that could begin a stop string."""
    if text.endswith("\ufffd"):
        return 1
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


async def _respond(svc: Service, job: _Job, kind: str) -> Any:
    steering = job.requested.steering
    if job.requested.gate is not None:  # a transformers prefill: off the event loop
        steering = await run_in_threadpool(decide_gate, job.requested, svc.artifacts,
                                           job.user_text)
    applied = job.requested.applied
    rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    head = {"id": rid, "created": int(time.time()), "model": svc.name}
    if job.stream:
        return StreamingResponse(_sse(svc, job, steering, kind, head, applied),
                                 media_type="text/event-stream")
    try:
        pieces = [p async for p in _pieces(svc, job, steering)]
    except RuntimeError as err:
        return _error(500, one_line(err))
    text = "".join(p[0] for p in pieces)
    _, reason, n = pieces[-1]
    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {**head, "object": kind, "choices": [choice],
            "usage": {"prompt_tokens": len(job.ids), "completion_tokens": n,
                      "total_tokens": len(job.ids) + n},
            "steering": applied}


async def _sse(svc: Service, job: _Job, steering: Steering | None, kind: str,
               head: dict[str, Any], applied: dict[str, Any]) -> AsyncIterator[str]:
    chat = kind == "chat.completion"
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, **extra: Any) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["delta"] = {} if text is None else {"content": text}
        else:
            choice["text"] = text or ""
        return f"data: {json.dumps({**head, 'object': obj, 'choices': [choice], **extra})}\n\n"

    if chat:
        first = {**head, "object": obj, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        yield f"data: {json.dumps(first)}\n\n"
    try:
        async for text, reason, _ in _pieces(svc, job, steering):
            if text:
                yield chunk(text, None)
            if reason is not None:
                yield chunk(None, reason, steering=applied)
    except RuntimeError as err:
        yield f"data: {json.dumps({'error': {'message': one_line(err), 'code': 500}})}\n\n"
    yield "data: [DONE]\n\n"


def _error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status == 400 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": status}}, status_code=status)
