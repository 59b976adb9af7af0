"""The API without a transport: a parsed request in; a status, headers and a body (bytes, or an
async stream of bytes) out.

Every route is written once, against ``ApiRequest`` / ``ApiResponse``, and ``dispatch`` runs the
part every route shares (the request id, the API key, the route table, errors in the route
family's shape). Two front doors call it: the aiohttp server (``server.app``, ``mace serve``)
and the Ray Serve ingress (``server.ray_serve``, ``mace serve --replicas N``); each only turns
its framework's request into an ``ApiRequest`` and writes the ``ApiResponse`` back.

A streamed body owns the engine streams behind it: the transport must ``await
response.close()`` when it stops writing (the client left, or the stream ended), which aborts
whatever still runs, whether the stream was started or not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from engine.sampling_params import InvalidRequestError
from server.errors import ApiError, param_of, is_expected, render_error

log = logging.getLogger(__name__)
_encode = msgspec.json.Encoder().encode
_OPEN_PATHS = frozenset({"/health"})


class BodyTooLarge(Exception):
    """The transport refused to read a body over ``ServerState.max_request_bytes``."""


@dataclass(slots=True)
class ApiRequest:
    state: Any  # the server's ServerState (server.state)
    method: str
    path: str
    headers: Mapping[str, str]  # case-insensitive lookups (both transports' header maps are)
    read: Callable[[], Awaitable[bytes]]  # the body, once; raises BodyTooLarge past the limit
    query: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""  # set by dispatch: the client's x-request-id when usable, else ours
    tenant: str | None = None  # set by dispatch: whose API key the request carries
    adapter: Any = None  # an AdapterChoice (server.adapters), set by the route once the request's `model` resolved

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()

    @property
    def is_tgi(self) -> bool:
        """Whether errors take TGI's shape (the ``/generate*`` routes) rather than OpenAI's."""
        return self.path.startswith("/generate")


@dataclass(slots=True)
class ApiResponse:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None  # a streamed body (SSE), written as it comes
    on_close: Callable[[], Awaitable[None]] | None = None  # what the stream holds open

    @classmethod
    def json(cls, value: object, status: int = 200, headers: dict[str, str] | None = None) -> ApiResponse:
        body = value if isinstance(value, bytes) else _encode(value)
        return cls(status, body, {"Content-Type": "application/json", **(headers or {})})

    @classmethod
    def text(cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8") -> ApiResponse:
        return cls(status, text.encode(), {"Content-Type": content_type})

    @classmethod
    def sse(cls, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]]) -> ApiResponse:
        """Server-sent events; ``on_close`` releases what they read (it runs even if the
        transport never started the stream)."""
        return cls(200, b"", {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}, events, on_close)

    async def close(self) -> None:
        """Release a streamed body: close the stream and what it holds (idempotent)."""
        stream, self.stream = self.stream, None
        on_close, self.on_close = self.on_close, None
        try:
            if stream is not None and hasattr(stream, "aclose"):
                await stream.aclose()
        finally:
            if on_close is not None:
                await on_close()


Handler = Callable[[ApiRequest], Awaitable[ApiResponse]]


class Routes:
    """Method and path to handler; what is not there is a 404 (405 for a known path)."""

    def __init__(self) -> None:
        self._table: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._table.setdefault(path, {})[method] = handler

    def get(self, path: str, handler: Handler) -> None:
        self.add("GET", path, handler)

    def post(self, path: str, handler: Handler) -> None:
        self.add("POST", path, handler)

    @property
    def paths(self) -> list[tuple[str, str]]:
        return [(method, path) for path, methods in self._table.items() for method in methods]

    def find(self, method: str, path: str) -> Handler:
        methods = self._table.get(path)
        if methods is None:
            raise ApiError(404, f"no route {path}", None, "not_found")
        handler = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)
        if handler is None:
            raise ApiError(405, f"{method} is not allowed on {path}; use {', '.join(sorted(methods))}", None,
                           "method_not_allowed")
        return handler


async def dispatch(request: ApiRequest) -> ApiResponse:
    """The response to ``request``: its route's, or an error in the route family's shape. Every
    response carries ``x-request-id`` (and ``x-adapter-version`` where an adapter answered)."""
    rid = request.headers.get("x-request-id", "")
    request.request_id = rid if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable() else uuid.uuid4().hex
    try:
        _authenticate(request)
        response = await request.state.routes.find(request.method, request.path)(request)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if not is_expected(exc):
            log.exception("unhandled error in %s", request.path)
        response = error_response(exc, request.is_tgi)
    response.headers.update(response_headers(request))
    return response


def response_headers(request: ApiRequest) -> dict[str, str]:
    """Headers every answer carries: the request id, and the serving adapter's version when a
    trainer is on (the version inference read when the response started)."""
    headers = {"x-request-id": request.request_id}
    state = request.state
    training = state.engine.training_for(request.tenant)
    choice = request.adapter
    if choice is not None and choice.version is not None:
        headers["x-adapter-version"] = str(choice.version)  # a pinned version
    elif training is not None and (choice is None or choice.adapter == state.adapters.live_adapter(request.tenant)):
        headers["x-adapter-version"] = str(training.adapter_version)  # the live adapter answered
    return headers


def error_response(exc: BaseException, is_tgi: bool) -> ApiResponse:
    status, body, headers = render_error(exc, is_tgi)
    return ApiResponse(status, body, headers)


async def read_json(request: ApiRequest, body_type: type):
    """Decode a JSON body into ``body_type`` or raise ``ApiError`` naming the problem."""
    if request.content_type != "application/json":
        raise ApiError(415, f"Content-Type must be application/json, got {request.content_type or 'none'}",
                       "Content-Type", "unsupported_media_type")
    try:
        raw = await request.read()
    except BodyTooLarge as exc:
        raise ApiError(413, f"the body is over the limit of {request.state.max_request_bytes} bytes",
                       None, "request_too_large") from exc
    try:
        return msgspec.json.decode(raw, type=body_type)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(str(exc), param_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"malformed JSON: {exc}") from exc


def _authenticate(request: ApiRequest) -> None:
    """The request's tenant from its key (``--tenants``), or a 401 when a key is needed and
    the request's is not valid."""
    state = request.state
    key, tenants = state.api_key, state.tenant_keys
    if (key is None and not tenants) or request.path in _OPEN_PATHS:
        return
    given = request.headers.get("Authorization", "")
    token = given[7:].encode() if given.startswith("Bearer ") else None
    tenant = _tenant_of(tenants, token) if tenants and token is not None else None
    if tenant is not None:
        request.tenant = tenant
    elif token is None or key is None or not hmac.compare_digest(token, key.encode()):
        raise ApiError(401, "a valid API key is required: Authorization: Bearer KEY", "Authorization", "invalid_api_key")


def _tenant_of(tenants: dict[str, str], token: bytes) -> str | None:
    """The tenant of ``token`` (every key compared in constant time), or None."""
    found = None
    for key, tenant in tenants.items():
        if hmac.compare_digest(token, key.encode()):
            found = tenant
    return found
