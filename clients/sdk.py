"""The async client SDK: one ``AsyncClient`` over aiohttp for the OpenAI and TGI routes.

Responses decode into the server's own wire structs (``protocol``), streams are read with
the server's SSE decoder (``protocol.sse``), so client and server cannot drift apart. Retries, with
exponential backoff (or the server's ``Retry-After``), happen only where a request certainly did
not run: 429 (queue full), 503 (shutting down) and connection failures before any response byte;
a stream is retried only before its first event, never in the middle.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

import aiohttp
import msgspec

from protocol import feedback as fb
from protocol import openai as oa
from protocol import tgi
from protocol.sse import DONE, iter_events

T = TypeVar("T")
_RETRY_STATUSES = frozenset({429, 503})


class MaceError(Exception):
    """Every error this SDK raises."""


class APIConnectionError(MaceError):
    """The server could not be reached, or the connection broke before the answer was complete."""


class APITimeoutError(APIConnectionError):
    """The request took longer than the client's ``timeout_s``."""


class APIError(MaceError):
    """The server answered with an error, in either body shape: OpenAI's ``{"error": {...}}``
    (``type``, ``param``, ``code``) or TGI's ``{"error", "error_type"}`` (``type`` holds
    ``error_type``). ``status`` is None for an error sent as an event inside a 200 stream."""

    def __init__(self, status: int | None, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None, body: bytes = b"") -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.body = body


def _api_error(status: int | None, body: bytes) -> APIError:
    """The error a body describes, whichever family's shape it has."""
    try:
        info = msgspec.json.decode(body, type=oa.ErrorResponse).error
        return APIError(status, info.message, info.type, info.param, info.code, body)
    except msgspec.MsgspecError:
        pass
    try:
        err = msgspec.json.decode(body, type=tgi.ErrorResponse)
        return APIError(status, err.error, err.error_type, body=body)
    except msgspec.MsgspecError:
        return APIError(status, body.decode(errors="replace") or "no error body", body=body)


def _decode(data: bytes, type_: type[T]) -> T:
    """``data`` as ``type_``; a body in an error shape raises its ``APIError`` instead."""
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.MsgspecError as exc:
        error = _api_error(None, data)
        if error.type is not None:
            raise error from None
        raise MaceError(f"unexpected response, not a {type_.__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """One streamed piece of chat choice ``index``; ``finish_reason`` is set on its last piece."""

    index: int
    content: str
    finish_reason: str | None = None
    logprobs: list[oa.ChatTokenLogprob] | None = None
    stop_reason: str | int | None = None


@dataclass(frozen=True, slots=True)
class Score:
    """Log-probs of a continuation given a prompt: its tokens, each one's log-prob, their sum."""

    tokens: list[str]
    token_logprobs: list[float]
    logprob: float


class Stream(Generic[T]):
    """The items of one streamed response, iterated once. ``usage`` is set once the server sends
    it (OpenAI routes with ``stream_options={"include_usage": True}``). Leaving early: use
    ``async with`` or ``await stream.aclose()``, which closes the connection and so aborts the
    request on the server."""

    def __init__(self, events: AsyncGenerator[bytes, None], parse: Callable[[bytes], tuple[list[T], oa.Usage | None]]) -> None:
        self._events = events
        self._parse = parse
        self._pending: deque[T] = deque()
        self.usage: oa.Usage | None = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        while not self._pending:
            items, usage = self._parse(await self._events.__anext__())
            self.usage = usage or self.usage
            self._pending.extend(items)
        return self._pending.popleft()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _chat_items(data: bytes) -> tuple[list[ChatDelta], oa.Usage | None]:
    chunk = _decode(data, oa.ChatCompletionChunk)
    deltas = [ChatDelta(c.index, c.delta.content or "", c.finish_reason, c.logprobs.content if c.logprobs else None,
                        c.stop_reason) for c in chunk.choices]
    return deltas, chunk.usage


def _completion_items(data: bytes) -> tuple[list[oa.CompletionChoice], oa.Usage | None]:
    chunk = _decode(data, oa.Completion)
    return chunk.choices, chunk.usage


def _tgi_items(data: bytes) -> tuple[list[tgi.StreamResponse], None]:
    return [_decode(data, tgi.StreamResponse)], None


class AsyncClient:
    """A client of one server: ``async with AsyncClient("http://127.0.0.1:8000") as client``.

    ``model`` is sent on OpenAI routes when given; ``timeout_s`` bounds each HTTP attempt, a
    stream's whole reading included; ``max_retries`` more attempts follow a 429, a 503 or a
    failed connection, after ``backoff_s * 2**attempt`` seconds or the server's ``Retry-After``.
    A ``session`` passed in is used and left open; otherwise the client owns and closes its own.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, model: str | None = None,
                 timeout_s: float = 600.0, max_retries: int = 3, backoff_s: float = 0.5,
                 session: aiohttp.ClientSession | None = None) -> None:
        if max_retries < 0 or backoff_s < 0 or timeout_s <= 0:
            raise ValueError("max_retries and backoff_s must be >= 0, timeout_s > 0")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this client made it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- transport --------------------------------------------------------------------------------

    @property
    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:  # made lazily: aiohttp wants a running loop
            self._session = aiohttp.ClientSession()
        return self._session

    def _delay_s(self, attempt: int, retry_after: str | None) -> float:
        try:
            return max(0.0, float(retry_after)) if retry_after is not None else self.backoff_s * 2**attempt
        except ValueError:  # an HTTP date: not worth parsing, back off as usual
            return self.backoff_s * 2**attempt

    async def _send(self, method: str, path: str, body: Any = None) -> aiohttp.ClientResponse:
        """An open response with a status below 400, or raise; the caller releases it."""
        headers = dict(self._headers)
        data = None
        if body is not None:
            data, headers["Content-Type"] = msgspec.json.encode(body), "application/json"
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        for attempt in range(self.max_retries + 1):
            is_last = attempt == self.max_retries
            try:
                response = await self._http.request(method, self.base_url + path, data=data, headers=headers,
                                                    timeout=timeout)
            except TimeoutError as exc:
                raise APITimeoutError(f"{method} {path}: no answer within {self.timeout_s} s") from exc
            except aiohttp.ClientConnectionError as exc:  # nothing came back: safe to send again
                if is_last:
                    raise APIConnectionError(f"{method} {path}: {exc}") from exc
                await asyncio.sleep(self._delay_s(attempt, None))
                continue
            if response.status < 400:
                return response
            async with response:
                raw = await self._read(response, path)
            if response.status not in _RETRY_STATUSES or is_last:
                raise _api_error(response.status, raw)
            await asyncio.sleep(self._delay_s(attempt, response.headers.get("Retry-After")))
        raise AssertionError("unreachable")

    async def _read(self, response: aiohttp.ClientResponse, path: str) -> bytes:
        try:
            return await response.read()
        except TimeoutError as exc:
            raise APITimeoutError(f"{path}: the answer took longer than {self.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise APIConnectionError(f"{path}: the connection broke mid-answer: {exc}") from exc

    async def _call(self, method: str, path: str, type_: type[T], body: Any = None) -> T:
        async with await self._send(method, path, body) as response:
            return _decode(await self._read(response, path), type_)

    async def _sse(self, path: str, body: Any) -> AsyncGenerator[bytes, None]:
        """The ``data`` of each event until ``[DONE]`` or the end of the body."""
        async with await self._send("POST", path, body) as response:
            try:
                async for event in iter_events(response.content.iter_any()):
                    if event.data == DONE:
                        return
                    yield event.data
            except TimeoutError as exc:
                raise APITimeoutError(f"{path}: the stream took longer than {self.timeout_s} s") from exc
            except aiohttp.ClientError as exc:
                raise APIConnectionError(f"{path}: the stream broke: {exc}") from exc

    def _openai_body(self, params: dict[str, Any], **fields: Any) -> dict[str, Any]:
        return {**({"model": self.model} if self.model else {}), **params, **fields}

    # -- OpenAI routes ----------------------------------------------------------------------------

    async def chat(self, messages: Sequence[dict[str, Any] | oa.ChatMessage], **params: Any) -> oa.ChatCompletion:
        """POST /v1/chat/completions. ``params`` are body fields (``temperature``, ``max_tokens``,
        ``n``, ``seed``, ``stop``, ``logprobs``, ``top_logprobs``, ``priority``, ``slo_ttft_ms``, ...)."""
        body = self._openai_body(params, messages=messages, stream=False)
        return await self._call("POST", "/v1/chat/completions", oa.ChatCompletion, body)

    def stream_chat(self, messages: Sequence[dict[str, Any] | oa.ChatMessage], **params: Any) -> Stream[ChatDelta]:
        """Stream /v1/chat/completions as ``ChatDelta`` items. The request is sent when iteration
        starts; an error answer (or an error event) raises ``APIError`` from the iteration."""
        body = self._openai_body(params, messages=messages, stream=True)
        return Stream(self._sse("/v1/chat/completions", body), _chat_items)

    async def complete(self, prompt: str | list[Any], **params: Any) -> oa.Completion:
        """POST /v1/completions (``max_tokens``, ``echo``, ``logprobs``, ``seed``, ...)."""
        body = self._openai_body(params, prompt=prompt, stream=False)
        return await self._call("POST", "/v1/completions", oa.Completion, body)

    def stream_complete(self, prompt: str | list[Any], **params: Any) -> Stream[oa.CompletionChoice]:
        """Stream /v1/completions: one ``CompletionChoice`` per piece of text."""
        body = self._openai_body(params, prompt=prompt, stream=True)
        return Stream(self._sse("/v1/completions", body), _completion_items)

    async def score(self, prompt: str, continuation: str, **params: Any) -> Score:
        """Log-probs of ``continuation`` after ``prompt`` (an echo of their concatenation).

        Continuation tokens are those starting at or after ``len(prompt)`` characters, so a token
        that straddles the boundary counts as the prompt's: start the continuation on a token
        boundary (e.g. with a space) to score exactly its text."""
        if not prompt or not continuation:
            raise ValueError("prompt and continuation must be non-empty")
        result = await self.complete(prompt + continuation, **params, echo=True, max_tokens=0, logprobs=0)
        lp = result.choices[0].logprobs
        if lp is None:
            raise MaceError("the server returned no log-probs for an echo with logprobs=0")
        picked = [(t, p) for t, p, off in zip(lp.tokens, lp.token_logprobs, lp.text_offset)
                  if off >= len(prompt) and p is not None]
        tokens, logprobs = [t for t, _ in picked], [p for _, p in picked]
        return Score(tokens, logprobs, sum(logprobs))

    async def feedback(self, prompt: str | Sequence[dict[str, Any] | oa.ChatMessage], chosen: str, rejected: str,
                       id: str | None = None) -> fb.FeedbackResponse:
        """POST /v1/feedback: one preference pair, ``chosen`` better than ``rejected`` as answers to
        ``prompt`` (a string: a completion prompt; a list: chat messages, stored as the chat
        template renders them). The server stores the pair before it answers; an ``id`` makes a
        resend harmless (a repeated id is counted in ``duplicates``, not stored twice)."""
        body: dict[str, Any] = {"chosen": chosen, "rejected": rejected}
        body["prompt" if isinstance(prompt, str) else "messages"] = prompt
        if id is not None:
            body["id"] = id
        return await self._call("POST", "/v1/feedback", fb.FeedbackResponse, body)

    async def feedback_stats(self) -> fb.FeedbackStats:
        """GET /v1/feedback/stats: pairs received, trained, pending and set aside."""
        return await self._call("GET", "/v1/feedback/stats", fb.FeedbackStats)

    async def adapters(self) -> dict[str, Any]:
        """GET /v1/adapters: ``{"training": bool, "serving": {"name", "version"} | None, ...}``
        (the serving adapter's version, and the trainer's counters when it trains)."""
        return await self._call("GET", "/v1/adapters", dict)

    async def models(self) -> oa.ModelList:
        """GET /v1/models."""
        return await self._call("GET", "/v1/models", oa.ModelList)

    async def health(self) -> bool:
        """True when GET /health answers 200; False when it answers otherwise (503 while
        shutting down) or the server cannot be reached. Never retried."""
        try:
            async with self._http.get(self.base_url + "/health", headers=self._headers,
                                      timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    # -- TGI routes -------------------------------------------------------------------------------

    async def generate(self, inputs: str, **parameters: Any) -> tgi.GenerateResponse:
        """POST /generate with ``{"inputs", "parameters"}`` (``max_new_tokens``, ``details``, ...)."""
        return await self._call("POST", "/generate", tgi.GenerateResponse, {"inputs": inputs, "parameters": parameters})

    def generate_stream(self, inputs: str, **parameters: Any) -> Stream[tgi.StreamResponse]:
        """Stream /generate_stream, one ``StreamResponse`` per token; the last one carries
        ``generated_text`` and ``details``. An error event raises ``APIError`` (status None)."""
        return Stream(self._sse("/generate_stream", {"inputs": inputs, "parameters": parameters}), _tgi_items)
