"""The OpenAI-compatible HTTP API: `create_app(RagService(...))` is a FastAPI app for uvicorn.

POST /v1/chat/completions (streaming or not), GET /v1/models, POST /v1/retrieve, GET /health. Every refusal is a
4xx with OpenAI's error body; an unexpected failure is a 500 with the same body, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cepe_rag.pipelines.session import RagSession, Retrieved
from cepe_rag.readers import GenerationConfig
from cepe_rag.serving.batching import Batcher, Job, QueueFull
from cepe_rag.serving.page import add_chat_page
from cepe_rag.serving.schemas import (
    ApiError,
    ChatCompletionRequest,
    ChatMessage,
    Limits,
    RetrieveRequest,
    passage_json,
)
from cepe_rag.settings import NOT_IN_DOCUMENTS
from cepe_rag.types import CepeRagError, Conversation, Passage, split_messages

log = logging.getLogger("cepe_rag.serving")


class RagService:
    """What a server holds: a RagSession (the readers loaded at start, by model id; the retriever; abstention),
    the limits on requests, and the batcher that decodes them."""

    def __init__(self, session: RagSession, *, limits: Limits | None = None, max_batch: int = 16,
                 max_waiting: int = 64, batch_window_ms: float = 5.0):
        self.session = session
        self.readers = session.readers
        self.limits = limits = limits or Limits()
        self.batcher = Batcher(session.readers, max_batch=max_batch, max_waiting=max_waiting,
                               window_s=batch_window_ms / 1000)

    def check_k(self, k: int | None) -> int:
        k = self.limits.default_k if k is None else k
        if not 1 <= k <= self.limits.max_k:
            raise ApiError(400, f"k must be between 1 and {self.limits.max_k}, got {k}", param="k",
                           code="k_out_of_range")
        return k

    def check_index(self) -> None:
        if self.session.retriever is None:
            raise ApiError(400, "this server has no index: send the passages to read in `passages`",
                           param="passages", code="no_index")

    async def retrieve(self, query: str, k: int) -> list[Passage]:
        self.check_index()
        return await asyncio.to_thread(lambda: self.session.search(query, k))

    async def passages_for(self, question: str, k: int, reader: str, conversation: Conversation) -> Retrieved:
        self.check_index()
        return await asyncio.to_thread(self.session.passages_for, question, k=k, reader=reader,
                                       conversation=conversation)


def create_app(service: RagService, *, api_key: str | None = None) -> FastAPI:
    """The FastAPI app over `service`; with `api_key`, /v1 routes need `Authorization: Bearer <api_key>`."""
    limits = service.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        service.batcher.stop()

    app = FastAPI(title="cepe-rag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Gate, api_key=api_key, max_body_bytes=limits.max_body_bytes)

    # --- errors: always OpenAI's body --------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:])  # drop the leading "body"
        if first.get("type") == "json_invalid":
            message, code, where = "the request body is not valid JSON", "invalid_json", ""
        else:
            message, code = (f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "invalid"),
                             "invalid_value")
        return JSONResponse(ApiError(400, message, code=code, param=where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return JSONResponse(ApiError(error.status_code, str(error.detail), code=code).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse(ApiError(500, "internal server error", type="server_error").body(), status_code=500)

    # --- routes -------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if not service.batcher.alive:
            raise ApiError(503, "the decoder thread is not running", type="server_error", code="unhealthy")
        return {"status": "ok", **service.batcher.counts()}

    add_chat_page(app)  # GET /: the chat page (static/chat.html); it needs no key, its /v1 requests do

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "cepe-rag"}
                                           for name in service.readers]}

    @app.post("/v1/retrieve")
    async def retrieve(body: RetrieveRequest):
        query = check_text(body.query, limits.max_message_chars, "query", "query")
        passages = await service.retrieve(query, service.check_k(body.k))
        return {"object": "list", "data": [passage_json(p) for p in passages]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        job = await make_job(service, body)
        try:
            if job.abstained:  # no retrieved passage is relevant enough: answered without the model
                job.text = NOT_IN_DOCUMENTS
                rule = f"no passage read: {job.abstained}"
                for event in (("start", job.passages, 0, rule), ("delta", NOT_IN_DOCUMENTS), ("end", "stop", 0)):
                    job.events.put_nowait(event)
            else:
                service.batcher.submit(job)
        except QueueFull as error:
            raise ApiError(429, str(error), type="rate_limit_error", code="queue_full") from None
        try:
            # Until the model starts on it (or refuses it), the request can still become a 4xx.
            start = await next_event(job, request)
            if start[0] == "error":
                raise start[1]
            read = {"passages_retrieved": len(job.passages),
                    "passages_read": 0 if job.abstained else len(start[1]), "rule": start[3]}
            completion = Completion(body.model, sources=start[1], prompt_tokens=start[2], read=read)
            if body.stream:
                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                return StreamingResponse(stream_events(service, job, completion, include_usage),
                                         media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            while (event := await next_event(job, request))[0] == "delta":
                pass
            if event[0] == "error":
                raise event[1]
            return completion.whole(job.text, finish_reason=event[1], completion_tokens=event[2])
        except ClientGone:
            service.batcher.cancel(job)  # free its slot; nobody reads this answer
            return JSONResponse(ApiError(499, "the client closed the request").body(), status_code=499)
        except BaseException:
            service.batcher.cancel(job)  # a refusal, or a cancelled task: free its slot
            raise

    return app


# --- chat completions ------------------------------------------------------------------------------------


def check_text(text: str, max_chars: int, what: str, param: str) -> str:
    text = text.strip()
    if not text:
        raise ApiError(400, f"{what} is empty", param=param, code="empty")
    if len(text) > max_chars:
        raise ApiError(400, f"{what} is {len(text):,} characters; at most {max_chars:,} are accepted", param=param,
                       code="too_long")
    return text


def request_messages(messages: list[ChatMessage], limits: Limits) -> tuple[Conversation, str]:
    """The request's conversation and question (`types.split_messages`, as for LangChain), within the limits."""
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"{len(messages)} messages; at most {limits.max_messages} are accepted",
                       param="messages", code="too_many_messages")
    for position, message in enumerate(messages):
        if len(message.text) > limits.max_message_chars:
            raise ApiError(400, f"messages.{position} is {len(message.text):,} characters; at most "
                                f"{limits.max_message_chars:,} are accepted", param="messages", code="too_long")
    try:
        conversation, question = split_messages([(m.role, m.text) for m in messages])
    except CepeRagError as error:
        raise ApiError(400, str(error), param="messages", code="no_question") from None
    return conversation, check_text(question, limits.max_message_chars, "the last user message", "messages")


async def make_job(service: RagService, body: ChatCompletionRequest) -> Job:
    """Validate the request against the limits, retrieve its passages and describe the decoding it needs."""
    limits = service.limits
    if body.model not in service.readers:
        raise ApiError(404, f"the model {body.model!r} does not exist; this server has: "
                            f"{', '.join(service.readers)}", param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="unsupported_value")
    max_tokens = body.max_completion_tokens or body.max_tokens or limits.default_max_tokens
    if max_tokens > limits.max_tokens:
        raise ApiError(400, f"max_tokens is {max_tokens}; at most {limits.max_tokens} are allowed",
                       param="max_tokens", code="too_many_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > limits.max_stop or any(not s or len(s) > 100 for s in stops):
        raise ApiError(400, f"stop: at most {limits.max_stop} non-empty strings of up to 100 characters",
                       param="stop", code="invalid_value")
    conversation, question = request_messages(body.messages, limits)
    k = service.check_k(body.k)
    found = Retrieved([], query=question)
    if body.passages is not None:  # the caller's own passages: always read
        if len(body.passages) > limits.max_passages:
            raise ApiError(400, f"{len(body.passages)} passages; at most {limits.max_passages} are accepted",
                           param="passages", code="too_many_passages")
        for position, p in enumerate(body.passages):
            if len(p.text) + len(p.title) > limits.max_passage_chars:
                raise ApiError(400, f"passages.{position} is longer than {limits.max_passage_chars:,} characters",
                               param="passages", code="too_long")
        own = [Passage(id=i, text=p.text, title=p.title, source=p.source) for i, p in enumerate(body.passages)]
        found.passages = await asyncio.to_thread(service.session.focused, question, own,
                                                 service.readers[body.model])
    elif service.readers[body.model].reads_passages:
        found = await service.passages_for(question, k, body.model, conversation)
    temperature = body.temperature or 0.0
    generation = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature,
                                  top_p=body.top_p if body.top_p is not None else 1.0, stop_strings=tuple(stops),
                                  seed=body.seed if temperature > 0 else None)  # greedy ignores seeds
    return Job(reader=body.model, question=question, passages=found.passages, generation=generation,
               conversation=conversation, loop=asyncio.get_running_loop(), abstained=found.abstained)


class ClientGone(Exception):
    pass


async def next_event(job: Job, request: Request, poll_s: float = 0.25) -> tuple:
    """The worker's next event for `job`; checks now and then that the client is still there (a request
    waiting in the queue or decoding unstreamed would otherwise keep its slot after the client left)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), poll_s)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone from None


class Completion:
    """The response objects of one chat completion, in OpenAI's format, with the passages read as `sources`."""

    def __init__(self, model: str, *, sources: list[Passage], prompt_tokens: int, read: dict | None = None):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.read = read or {}  # how many passages were retrieved and read, and why (the relevance cutoff)
        self.created = int(time.time())
        self.model = model
        self.sources = [passage_json(p) for p in sources]
        self.prompt_tokens = prompt_tokens

    def base(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, *, finish_reason: str, completion_tokens: int) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                  "logprobs": None}
        return {**self.base("chat.completion"), "choices": [choice], "usage": self.usage(completion_tokens),
                "sources": self.sources, "read": self.read}

    def chunk(self, delta: dict, finish_reason: str | None = None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return sse({**self.base("chat.completion.chunk"), "choices": [choice], **extra})


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def stream_events(service: RagService, job: Job, completion: Completion,
                        include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. When the client disconnects,
    Starlette cancels this generator, and `finally` frees the job's row."""
    try:
        yield completion.chunk({"role": "assistant", "content": ""}, sources=completion.sources, read=completion.read)
        while True:
            event = await job.events.get()
            if event[0] == "delta":
                yield completion.chunk({"content": event[1]})
                continue
            if event[0] == "error":  # headers are sent: report in the stream, as OpenAI does
                yield sse(event[1].body())
            else:
                yield completion.chunk({}, finish_reason=event[1])
                if include_usage:
                    yield sse({**completion.base("chat.completion.chunk"), "choices": [],
                               "usage": completion.usage(event[2])})
            yield sse("[DONE]")
            return
    finally:
        service.batcher.cancel(job)


class Gate:
    """Checks what can be checked before a body is read: the API key on /v1 routes (401), and the body's size
    (413 over `max_body_bytes`, 411 for a body of unknown length)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    def refusal(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith("/v1/"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            # Constant time: how long a refusal takes says nothing about how much of a guessed key is right.
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return ApiError(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                                code="invalid_api_key")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            length = headers.get(b"content-length")
            if length is None and b"transfer-encoding" in headers:
                return ApiError(411, "send a Content-Length header", code="length_required")
            if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
                return ApiError(413, f"the request body is over {self.max_body_bytes:,} bytes",
                                code="body_too_large")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (error := self.refusal(scope)) is not None:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)
