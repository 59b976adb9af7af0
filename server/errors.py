"""Errors of the HTTP layer and their two body shapes.

``/v1/*`` answers OpenAI's ``{"error": {"message", "type", "param", "code"}}``; ``/generate*``
answers TGI's ``{"error", "error_type"}``. Handlers raise; ``server.api.dispatch`` renders.
"""

from __future__ import annotations

import re

import msgspec

from engine.sampling_params import InvalidRequestError
from scheduler.async_engine import EngineError
from protocol import openai, tgi
from server.serving import Overloaded, ShuttingDown
from trainer.feedback import StoreUnavailable

_encode = msgspec.json.Encoder().encode
_PATH = re.compile(r"at `\$\.?([^`]*)`")
_MISSING = re.compile(r"missing required field `([^`]*)`")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


def param_of(message: str) -> str | None:
    """The field a msgspec validation message is about: its path, and a missing field's name."""
    path, missing = _PATH.search(message), _MISSING.search(message)
    parts = [m.group(1) for m in (path, missing) if m is not None and m.group(1)]
    return ".".join(parts) or None


def is_expected(exc: BaseException) -> bool:
    """Errors that are the request's fault or the server's state, not a bug of ours."""
    return isinstance(exc, (ApiError, InvalidRequestError, Overloaded, ShuttingDown, EngineError, StoreUnavailable))


_TGI_KIND = {401: "unauthorized", 404: "not_found"}


def classify(exc: BaseException, is_tgi: bool) -> tuple[int, str, str | None, str | None, str]:
    """(status, message, param, code, kind) for an exception a handler raised."""
    if isinstance(exc, ApiError):
        return exc.status, str(exc), exc.param, exc.code, _TGI_KIND.get(exc.status, "validation")
    if isinstance(exc, InvalidRequestError):
        return (422 if is_tgi else 400), str(exc), exc.param, exc.code, "validation"
    if isinstance(exc, Overloaded):
        return 429, str(exc), None, exc.code, "overloaded"
    if isinstance(exc, ShuttingDown):
        return 503, str(exc), None, "shutting_down", "unavailable"
    if isinstance(exc, StoreUnavailable):
        return 503, str(exc), None, "store_unavailable", "unavailable"
    if isinstance(exc, EngineError):
        return 500, str(exc), None, None, "generation"
    return 500, f"internal error: {type(exc).__name__}", None, None, "generation"


_OPENAI_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


def error_body(status: int, message: str, param: str | None, code: str | None, kind: str, is_tgi: bool) -> bytes:
    if is_tgi:
        return _encode(tgi.ErrorResponse(error=message, error_type=kind))
    etype = _OPENAI_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
    return _encode(openai.ErrorResponse(openai.ErrorInfo(message=message, type=etype, param=param, code=code)))


def render_error(exc: BaseException, is_tgi: bool) -> tuple[int, bytes, dict[str, str]]:
    """(status, JSON body, headers) of the error answer to ``exc``."""
    status, message, param, code, kind = classify(exc, is_tgi)
    headers = {"Content-Type": "application/json"}
    # 429 (queue full) and 503 (draining, loading) are worth retrying; say when
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif code in ("shutting_down", "loading", "store_unavailable"):
        headers["Retry-After"] = "1"
    return status, error_body(status, message, param, code, kind, is_tgi), headers
