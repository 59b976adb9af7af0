"""Async SDK, load generator and benchmarks that talk to the server over HTTP (issues 3 and 7)."""

from clients.sdk import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    ChatDelta,
    MaceError,
    Score,
    Stream,
)

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AsyncClient",
    "ChatDelta",
    "MaceError",
    "Score",
    "Stream",
]
