"""An OpenAI-compatible chat-completions endpoint over an ``Orchestrator``.

Agent frameworks speak the OpenAI protocol, so ``reasonspec serve`` puts the
orchestrator behind ``/v1/chat/completions`` (streaming and not), ``/v1/models``
and ``/health``. The protocol decisions, and why:

- **reasoning vs answer**: ``message.reasoning_content`` carries the reasoning the
  policy accepted (``Result.text``), as vLLM and DeepSeek reasoning servers do;
  ``message.content`` carries what an agent acts on: the text after ``</think>``
  when the model closes its thinking, else the final step (the last
  ``\\n\\n``-separated paragraph: "So the answer is \\boxed{N}." for the arith
  models, which write no ``</think>``). The split is made at the *first*
  ``</think>`` so that a stream can hand out reasoning deltas before it knows
  the rest; a later ``</think>`` is answer text.
- **streaming**: each accepted segment becomes a ``reasoning_content`` delta the
  moment the policy accepts it; every segment (rejected ones too) carries its
  audit record in ``delta.reasonspec`` (author, kind, accepted, score, tokens),
  never a rejected segment's text. The answer follows as one ``content`` delta.
- **sampling**: the run configuration's sampling applies. ``temperature`` and
  ``top_p`` are validated and accepted for client compatibility but not
  honoured: a policy's thresholds are tuned with the run's sampling, and one
  request must not silently run a different algorithm. ``seed`` is honoured.
- **budget**: ``max_completion_tokens`` (or the older ``max_tokens``) is the
  request's token budget, which policies count in *accepted* tokens;
  ``usage.completion_tokens`` counts every token written, rejected drafts
  included, so it can exceed the budget.
- **prompt**: messages reach the chat template as given; the config's
  instruction and system prompt are not added (the client owns the
  conversation, as with any OpenAI server).
- **cancellation**: a client that goes away cancels its request's policy task
  (the stream is closed, or a watcher sees the disconnect of a plain request),
  so abandoned requests stop using the backends.
- **context**: a prompt that leaves a model under ``MIN_OUTPUT_TOKENS`` of its
  context is a 400 ``context_length_exceeded`` before any model work; a chain that
  fills the context ends with ``finish_reason: "length"``. The token budget is not
  checked against the context (policies count accepted tokens, not positions).
- **slow clients**: a request must arrive whole within ``READ_TIMEOUT_S`` (a
  connection that sends half a request is closed), idle keep-alive connections
  close after ``KEEP_ALIVE_S``; shutdown waits ``SHUTDOWN_GRACE_S`` for open
  requests, then cancels them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from uvicorn.protocols.http.auto import AutoHTTPProtocol
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from orchestrator.config import RunConfig
from orchestrator.context import ContextLengthError
from orchestrator.core import Orchestrator
from orchestrator.prompting import Messages
from orchestrator.session import Result, Segment

logger = logging.getLogger("reasonspec.server")

#: Largest request body accepted (413 beyond): chat requests are small, and reading
#: an unbounded body would let one client exhaust the server's memory.
MAX_BODY_BYTES = 1 << 20
#: A request may ask for up to this many times the config's ``sampling.max_tokens``.
MAX_TOKENS_FACTOR = 4
#: Seconds a connection may take to send a whole request (headers and body) once it waits for one.
READ_TIMEOUT_S = 10.0
#: Seconds an idle keep-alive connection stays open (uvicorn's default).
KEEP_ALIVE_S = 5
#: Seconds shutdown waits for open requests before cancelling them (a long reasoning must not hold Ctrl-C).
SHUTDOWN_GRACE_S = 3
#: Status for a request whose client went away (nginx's convention; nobody reads it).
CLIENT_CLOSED_REQUEST = 499
THINK_END = "</think>"
_LIMIT_KEY = "max_tokens_limit"
_NOT_HONOURED = "accepted for compatibility, not honoured: the config's sampling applies"

T = TypeVar("T")


# ---------------------------------------------------------------- request


class _Lenient(BaseModel):
    """Unknown fields are ignored: clients send many optional OpenAI fields (``user``, ``logprobs``...)."""

    model_config = ConfigDict(extra="ignore")


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant"]
    content: str = Field(description="a string, or OpenAI's list of text parts (joined by newlines, as vLLM does)")

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            raise ValueError('content parts must be {"type": "text", "text": "..."}: only text is supported')
        return "\n".join(p["text"] for p in v)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """The accepted subset of OpenAI's request body.

    Validate with ``context={"max_tokens_limit": N}`` to bound the token budget by
    the serving config (the limit depends on the run, not on this schema).
    """

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, description=_NOT_HONOURED)
    top_p: float | None = Field(None, gt=0, le=1, description=_NOT_HONOURED)
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported; send several requests for several samples")
        return v

    @field_validator("max_tokens", "max_completion_tokens")
    @classmethod
    def _within_limit(cls, v: int | None, info: ValidationInfo) -> int | None:
        limit = (info.context or {}).get(_LIMIT_KEY)
        if v is not None and limit is not None and v > limit:
            raise ValueError(f"must be at most {limit} for this server")
        return v

    @property
    def budget(self) -> int | None:
        """The request's token budget; ``max_completion_tokens`` wins as OpenAI's current name. None: the config's."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# ---------------------------------------------------------------- responses


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "reasonspec"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReasonspecUsage(BaseModel):
    """What speculation did for this request: the extension field ``usage.reasonspec``."""

    policy: str
    tokens: dict[str, int] = Field(description="tokens written by each model, rejected ones included")
    accepted_tokens: dict[str, int] = Field(description="tokens of each model kept in the reasoning")
    proposed: int
    accepted: int
    acceptance_rate: float | None
    wall_s: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    reasonspec: ReasonspecUsage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str


FinishReason = Literal["stop", "length"]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class SegmentInfo(BaseModel):
    """A segment's audit record in ``delta.reasonspec``: who wrote it and whether it was kept."""

    author: str
    kind: str
    accepted: bool
    score: float | None
    tokens: int

    @classmethod
    def of(cls, seg: Segment) -> SegmentInfo:
        return cls(author=seg.author, kind=seg.kind, accepted=seg.accepted, score=seg.score, tokens=seg.tokens)


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasonspec: SegmentInfo | None = None

    @model_serializer(mode="wrap")
    def _present_fields(self, handler: Any) -> dict[str, Any]:
        """A delta carries only what changed, as OpenAI's do."""
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


# ---------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's shape, ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(e: ValidationError) -> APIError:
    """One 400 for every schema problem (FastAPI would say 422; OpenAI clients expect 400), naming the field."""
    errors = e.errors(include_url=False)
    parts = [f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in errors]
    first = ".".join(map(str, errors[0]["loc"])) or None
    return APIError(400, "invalid request: " + "; ".join(parts), param=first, code="invalid_value")


# ---------------------------------------------------------------- answer / reasoning split


class ReasoningSplitter:
    """Splits model text into reasoning and answer at the first ``</think>``, incrementally.

    Feeding the whole text at once or segment by segment gives the same result,
    which is what keeps streamed and non-streamed responses identical. Text that
    could be the start of a ``</think>`` split across segments is held back until
    the next segment (or ``finish``) decides it.
    """

    def __init__(self) -> None:
        self.reasoning = ""
        self._held = ""
        self._after: str | None = None  # text after </think>, once seen

    def feed(self, text: str) -> str:
        """Take the next accepted text; return the reasoning that can be handed out now."""
        if self._after is not None:
            self._after += text
            return ""
        pending = self._held + text
        head, sep, tail = pending.partition(THINK_END)
        if sep:
            self._after, self._held = tail, ""
        else:
            keep = next((k for k in range(min(len(THINK_END) - 1, len(head)), 0, -1)
                         if THINK_END.startswith(head[-k:])), 0)
            head, self._held = head[: len(head) - keep], head[len(head) - keep:]
        self.reasoning += head
        return head

    def finish(self) -> tuple[str, str]:
        """End of text: (the held-back reasoning still to hand out, the answer)."""
        tail, self._held = self._held, ""
        self.reasoning += tail
        if self._after is not None:
            return tail, self._after.strip()
        return tail, self.reasoning.strip().rpartition("\n\n")[2].strip()


def split_answer(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a finished text; see ``ReasoningSplitter``."""
    splitter = ReasoningSplitter()
    splitter.feed(text)
    _, answer = splitter.finish()
    return splitter.reasoning, answer


# ---------------------------------------------------------------- bookkeeping


@dataclass
class ServerStats:
    """Request counters on ``app.state.stats``: how a probe (or a test) sees that abandoned requests stop."""

    active: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0

    @contextmanager
    def track(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        except (ClientDisconnect, asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        except BaseException:
            self.failed += 1
            raise
        else:
            self.completed += 1
        finally:
            self.active -= 1


def _finish_reason(result: Result) -> FinishReason:
    """The session ran out of its token budget -> "length"; it answered, hit EOS or stopped -> "stop"."""
    return "length" if result.metrics.finish_reason in ("budget", "length") else "stop"


def _usage(result: Result, prompt_tokens: int) -> Usage:
    m = result.metrics
    completion = sum(m.tokens.values())
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        reasonspec=ReasonspecUsage(
            policy=result.policy, tokens=dict(m.tokens), accepted_tokens=dict(m.accepted_tokens),
            proposed=m.proposed, accepted=m.accepted, acceptance_rate=m.acceptance_rate, wall_s=round(m.wall_s, 4),
        ),
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (declared or streamed)."""
    too_large = APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _until_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body is consumed, so the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: asyncio.Task[T]) -> T:
    """``work``'s result; cancels it and raises ``ClientDisconnect`` if the client leaves first."""
    watcher = asyncio.create_task(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work.cancel()  # a no-op once finished; stops the solve when the client (or the server) gave up
    if work in done:
        return work.result()
    raise ClientDisconnect()


# ---------------------------------------------------------------- the app


@dataclass(frozen=True)
class _Call:
    """One validated request, ready for the orchestrator."""

    id: str
    created: int
    messages: Messages
    prompt_tokens: int
    request: ChatCompletionRequest

    def solve_kwargs(self) -> dict[str, Any]:
        # Without a client seed, the request id varies the seed per request (fresh samples under
        # temperature > 0, as OpenAI does); with one, the id is left out so the seed alone decides.
        req = self.request
        return {"id": None if req.seed is not None else self.id, "seed": req.seed, "max_tokens": req.budget}


def _failure(call: _Call, e: Exception) -> APIError:
    """A failed solve, logged and answered as a 500 by the endpoint itself.

    Handled here rather than by a catch-all handler: an exception that escapes the
    app makes uvicorn drop the connection, which a client's pool may be reusing.
    """
    logger.error("request %s failed", call.id, exc_info=e)
    return APIError(500, f"the orchestrator failed: {e!r}", type="server_error")


def create_app(orch: Orchestrator, model_name: str | None = None) -> FastAPI:
    """The OpenAI-compatible app serving ``orch`` as model ``model_name`` (default: the config's name).

    The app owns the orchestrator's workers for its lifetime: its lifespan starts
    them before the first request and closes them at shutdown. ``app.state``
    holds the ``orchestrator`` and the request counters, ``stats`` (``ServerStats``).
    """
    name = model_name or orch.config.name
    max_tokens_limit = orch.config.sampling.max_tokens * MAX_TOKENS_FACTOR
    created = int(time.time())
    stats = ServerStats()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await orch.start()
        try:
            yield
        finally:
            await orch.aclose()

    app = FastAPI(title="reasonspec", summary=f"OpenAI-compatible endpoint for {name}", lifespan=lifespan)
    app.state.stats = stats
    app.state.orchestrator = orch

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_exception(_: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return APIError(e.status_code, str(e.detail), type=kind).response()

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(_: Request, __: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        """Last resort, for a bug in the server itself: OpenAI's shape still (uvicorn logs it, drops the connection)."""
        return APIError(500, f"internal error: {e!r}", type="server_error").response()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=created)])

    async def parse(request: Request) -> _Call:
        body = await _read_body(request, MAX_BODY_BYTES)
        try:
            req = ChatCompletionRequest.model_validate_json(body, context={_LIMIT_KEY: max_tokens_limit})
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        messages = [m.model_dump() for m in req.messages]  # the {role, content} the chat template takes
        # Every model's prompt, checked here so that a template's refusal of the conversation or a prompt
        # that does not fit a model's context is a 400 before any model work. ``prompt_tokens`` reports
        # the prompt as the model the endpoint answers for sees it (the large one when there is one).
        try:
            prompts = orch.prompt_ids(messages)
        except TemplateError as e:
            raise APIError(400, f"the model's chat template rejected the messages: {e}", param="messages") from None
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        n_prompt = len(prompts["large" if "large" in prompts else next(iter(prompts))])
        return _Call(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), messages, n_prompt, req)

    @app.post("/v1/chat/completions", response_model=None,
              responses={200: {"model": ChatCompletion, "description": "a completion, or an SSE stream of chunks"}})
    async def chat_completions(request: Request) -> Response:
        call = await parse(request)
        if call.request.stream:
            return EventSourceResponse(_sse(call), sep="\n")
        with stats.track():
            try:
                result = await _unless_disconnected(request, asyncio.create_task(
                    orch.asolve(call.messages, **call.solve_kwargs())))
            except ClientDisconnect:
                raise
            except Exception as e:
                raise _failure(call, e) from e
        reasoning, answer = split_answer(result.text)
        completion = ChatCompletion(
            id=call.id, created=call.created, model=name,
            choices=[Choice(message=AssistantMessage(content=answer, reasoning_content=reasoning),
                            finish_reason=_finish_reason(result))],
            usage=_usage(result, call.prompt_tokens),
        )
        return JSONResponse(completion.model_dump(mode="json"))

    async def _sse(call: _Call) -> AsyncIterator[str]:
        """SSE data lines: the chunks, then ``[DONE]``; a failure mid-stream becomes an error event."""
        try:
            with stats.track():
                async for chunk in _chunks(call):
                    yield chunk.model_dump_json()
        except Exception as e:
            yield json.dumps(_failure(call, e).body())
        yield "[DONE]"

    async def _chunks(call: _Call) -> AsyncIterator[ChatCompletionChunk]:
        def chunk(delta: Delta, finish: FinishReason | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=call.id, created=call.created, model=name,
                                       choices=[ChunkChoice(delta=delta, finish_reason=finish)])

        splitter = ReasoningSplitter()
        yield chunk(Delta(role="assistant", content=""))
        # aclosing: however this generator ends (client gone included), the orchestrator's
        # stream is closed at once, and closing it cancels the request's policy task.
        async with aclosing(orch.stream(call.messages, **call.solve_kwargs())) as events:
            async for event in events:
                if event.type == "segment":
                    seg = event.segment
                    text = splitter.feed(seg.text) if seg.accepted else ""
                    yield chunk(Delta(reasoning_content=text or None, reasonspec=SegmentInfo.of(seg)))
                    continue
                result: Result = event.result  # "done": the last event
                tail, answer = splitter.finish()
                yield chunk(Delta(reasoning_content=tail or None, content=answer))
                yield chunk(Delta(), finish=_finish_reason(result))
                if call.request.include_usage:
                    yield ChatCompletionChunk(id=call.id, created=call.created, model=name, choices=[],
                                              usage=_usage(result, call.prompt_tokens))

    return app


def read_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that does not send a whole request within ``seconds``.

    uvicorn bounds only idle keep-alive connections: a client that sends half a request's
    headers or body would hold its socket (and, for a body, its handler) forever. The deadline
    is armed whenever the connection waits for a request (on connect and after each response)
    and, when it fires, closes the connection if no new request head has arrived or its body is
    still incomplete (the handler then sees a disconnect). A request being answered is not timed.
    It reads two attributes both of uvicorn's HTTP/1.1 protocols keep: ``cycle`` (the request,
    made once its head is parsed) and ``cycle.more_body``.
    """

    class ReadDeadlineProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(seconds, self._expire, self.cycle)

        def _expire(self, waited_after: Any) -> None:
            cycle = self.cycle
            no_head = cycle is waited_after and (cycle is None or cycle.response_complete)
            no_body = cycle is not None and not cycle.response_complete and cycle.more_body
            if (no_head or no_body) and not self.transport.is_closing():
                logger.info("closing %s: no whole request within %ss", self.client, seconds)
                self.transport.close()

    return ReadDeadlineProtocol


def server_settings(read_timeout: float = READ_TIMEOUT_S) -> dict[str, Any]:
    """uvicorn's settings for ``reasonspec serve`` (the in-process test server uses them too)."""
    return {"http": read_deadline_protocol(read_timeout), "timeout_keep_alive": KEEP_ALIVE_S,
            "timeout_graceful_shutdown": SHUTDOWN_GRACE_S}


def serve(cfg: RunConfig, host: str, port: int, read_timeout: float = READ_TIMEOUT_S) -> None:
    """Serve ``cfg`` with uvicorn until interrupted (``reasonspec serve``)."""
    uvicorn.run(create_app(Orchestrator(cfg)), host=host, port=port, **server_settings(read_timeout))
