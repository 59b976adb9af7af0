"""What the route handlers share, kept on the aiohttp application under one key."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from scheduler.async_engine import AsyncEngine
from server.adapters import AdapterChoice, Adapters
from server.metrics import ServerMetrics
from server.serving import Serving
from trainer.feedback import FeedbackStore


@dataclass
class ServerState:
    engine: AsyncEngine
    serving: Serving
    metrics: ServerMetrics
    model_name: str  # what /v1/models lists and responses carry
    model_aliases: frozenset[str]  # names a request's `model` may use
    created: int  # unix seconds the server started
    api_key: str | None = None
    shutdown_grace_s: float = 30.0
    feedback: FeedbackStore | None = None  # preference pairs for the trainer (None: /v1/feedback answers 503)
    adapters: Adapters | None = None  # what a request's `model` may choose (built by build_app)
    tenant_keys: dict[str, str] | None = None  # API key -> tenant (--tenants)


STATE = web.AppKey("state", ServerState)
# The id a response shows (x-request-id): the client's own when it sent one, else ours.
REQUEST_ID = web.RequestKey("request_id", str)
# The adapter the request chose, once its `model` is resolved.
ADAPTER = web.RequestKey("adapter", AdapterChoice)
# The tenant whose key the request carries (None: no tenant, the default adapter).
TENANT = web.RequestKey("tenant", object)


def response_headers(request: web.Request) -> dict[str, str]:
    """Headers every answer carries: the request id, and the serving adapter's version when a
    trainer is on (the version inference read when the response started)."""
    headers = {"x-request-id": request[REQUEST_ID]}
    training = request.app[STATE].engine.training_for(request.get(TENANT))
    choice = request.get(ADAPTER)
    if choice is not None and choice.version is not None:
        headers["x-adapter-version"] = str(choice.version)  # a pinned version
    elif training is not None and (choice is None or choice.adapter == request.app[STATE].adapters.live_adapter(
            request.get(TENANT))):  # the live adapter answered
        headers["x-adapter-version"] = str(training.adapter_version)
    return headers
