"""What the route handlers share: one ``ServerState`` per server (the aiohttp application keeps
it under ``STATE``; a Ray Serve replica holds it), reached from each request as ``request.state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from scheduler.async_engine import AsyncEngine
from server.adapters import Adapters
from server.api import ApiRequest, Routes
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
    max_request_bytes: int = 4 << 20  # a longer body is a 413
    routes: Routes = field(default_factory=Routes)  # every route of the API (server.service)
    cluster: object | None = None  # a Ray Serve replica's coordinator (server.ray_serve.Cluster)


STATE = web.AppKey("state", ServerState)

