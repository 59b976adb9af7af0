"""What talks to the server over HTTP: the async SDK, the load generator and its workloads, the
preference oracle and the drift evaluator. Imports ``protocol`` for the wire types, never ``server``."""

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
